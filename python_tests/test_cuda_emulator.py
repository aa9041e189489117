"""Every CUDA kernel of csrc/kernels executed on the CPU, GPU or not, and the op layer's CUDA path.

The kernel files are compiled as C++ against the CUDA emulator (csrc/testing/cuda_emulator.h: one
fiber per CUDA thread, checked barriers and warp collectives, poisoned and bounded shared memory)
and run by csrc/testing/emulator_test.cpp against their CPU twins on the cases of the CUDA tests,
under four thread orders (docs/cuda_emulator.md). This needs only g++ (C++20): without it, and only
then, these tests are skipped. csrc/testing/op_layer_test.cpp runs the ops' CUDA registrations
(csrc/ops, through torch's dispatcher, with CUDA tensors in the emulator's memory) against the CPU
ops; it also needs torch's C++ headers and CPU library, which the test environment always has.
csrc/testing/pipeline_test.cpp runs the pipeline's NCCL transport over a fake NCCL.
"""

import subprocess

import pytest

from cuda_emulator_build import CXX, build, build_op_layer, build_pipeline, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason=f"no C++ compiler ({CXX}) to build the CUDA emulator test")


@pytest.fixture(scope="module")
def driver():
    return build()


def run(driver, *args, timeout=900):
    return subprocess.run([str(driver), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["topk", "draft_loss", "tree_attention", "verify", "launch", "checks"])
def test_cuda_kernels_match_cpu_twins_on_the_emulator(driver, family):
    done = run(driver, family)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "runs passed" in done.stdout
    print(done.stdout)


# Kernels with a known bug, built into the test binary: the emulator must report each one (exit 3).
@pytest.mark.parametrize(
    "name,message",
    [
        ("deadlock", "deadlock: no thread can run"),
        ("divergent_barrier", "divergent __syncthreads"),
        ("divergent_shuffle", "divergent warp collective"),
        ("exited_lane", "exited while named in the mask"),
        ("shuffle_outside_mask", "which is not in the mask"),
        ("shared_overflow", "past the end of dynamic shared memory"),
        ("shared_slack", "a write past the end of dynamic shared memory"),
        ("misaligned_load", "misaligned __ldcs of 16 bytes"),
        ("global_overflow", "outside a cudaMalloc'd buffer"),
        ("endless_loop", "the launch ran past 1 s of CPU"),
    ],
)
def test_emulator_reports_the_bug(driver, name, message):
    done = run(driver, "selftest", name, timeout=60)
    assert done.returncode == 3 and message in done.stderr, f"exit {done.returncode}\n{done.stderr}"


def test_emulator_poisons_shared_memory(driver):
    # A shared variable read before any write gives the poison (all bits set), not a zero.
    done = run(driver, "selftest", "uninitialised_shared", timeout=60)
    assert done.returncode == 0 and "read ffffffff" in done.stdout, done.stdout + done.stderr


def test_op_layer_on_the_emulator():
    """The ops with CUDA tensors: each kernel launched on the current stream of its tensors' device
    under a device guard, no device-to-host transfer (host sync), the CPU op's results; inputs that
    the kernels check on the device raised by the next call with the CPU op's message."""
    done = run(build_op_layer(), timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "0 failed" in done.stdout, done.stdout
    print(done.stdout)


def test_nccl_channel_on_a_fake_nccl():
    """pipeline/nccl_comm.cpp over a fake NCCL and the emulator's streams: tickets and their pooled
    events, waits bounded by their timeout, aborts (once; a failed one raised), an operation queued
    without its event aborting the channel, a teardown that waits for nothing (a synchronize that
    would wait forever is an emulator fault) and an event after the channel's last work."""
    done = run(build_pipeline(), timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "0 failed" in done.stdout, done.stdout
