"""Builds of the CUDA emulator tests: the CUDA kernel files compiled as C++ against the emulator
(csrc/testing/cuda_emulator.h), linked with their CPU twins and

- build(): the kernel test (csrc/testing/emulator_test.cpp), which calls the kernels' launchers
  directly; no torch and no CUDA toolkit are involved, only a C++20 compiler;
- build_op_layer(): the op layer's test (csrc/testing/op_layer_test.cpp): csrc/ops and the op
  schemas compiled against torch's headers with the emulator standing in for CUDA, linked with
  torch's CPU library only (libtorch_cpu, libc10);
- build_pipeline(): the NCCL transport's test (csrc/testing/pipeline_test.cpp): pipeline/nccl_comm.cpp
  over a fake NCCL (csrc/testing/fake_nccl) and the emulator's streams and events.

Objects are cached in build/cuda_emulator/ under a hash of their source, every header they may
include and the flags, so a rerun, or a mutation of one kernel file (scripts/cuda_emulator_mutations.py),
recompiles only what changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++20", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Wno-psabi"]
# Emulated kernels: no contraction of a * b + c into an fma (the driver recomputes some values
# with the same operations and compares them bit for bit); the emulator's headers before any other.
KERNEL_FLAGS = ["-ffp-contract=off", "-I{root}/csrc/testing/include", "-I{root}/csrc/testing"]
DRIVER_FLAGS = KERNEL_FLAGS + ["-Wno-missing-field-initializers", "-Wno-maybe-uninitialized"]
# The op layer against torch's headers (as system headers: their warnings are not ours), with the
# emulator's CUDA runtime and device guard (TORCHSPEC_OPS_ON_EMULATOR, ops/cuda_context.h).
OPS_FLAGS = KERNEL_FLAGS + ["-DTORCHSPEC_WITH_CUDA", "-DTORCHSPEC_OPS_ON_EMULATOR", "-fopenmp", "-Wno-unused-parameter"]
OPS_SOURCES = [
    "ops/device_errors.cpp",
    "ops/draft_loss_ops.cpp",
    "ops/topk_ops.cpp",
    "ops/tree_ops.cpp",
    "torch_bindings.cpp",
]


def compiler() -> str | None:
    return shutil.which(CXX)


def torch_paths() -> tuple[list[Path], Path] | None:
    """(include folders, library folder) of the installed torch, found without importing it; None
    without torch or its C++ headers and CPU library."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0])
    include = [base / "include", base / "include" / "torch" / "csrc" / "api" / "include"]
    lib = base / "lib"
    if not (include[0] / "ATen" / "ATen.h").exists() or not (lib / "libtorch_cpu.so").exists():
        return None
    return include, lib


def _headers(root: Path) -> list[Path]:
    found = []
    for folder in ("common", "cpu", "kernels", "ops", "pipeline", "testing"):
        found += sorted(p for p in (root / "csrc" / folder).rglob("*") if p.suffix in (".h", ".cuh"))
    return found


def _units(root: Path) -> list[tuple[Path, list[str]]]:
    """(source, extra flags) of every object of the test binary."""
    units = [(p, ["-x", "c++"] + KERNEL_FLAGS) for p in sorted((root / "csrc" / "kernels").glob("*.cu"))]
    units += [(p, []) for p in sorted((root / "csrc" / "cpu").glob("*.cpp"))]
    units.append((root / "csrc" / "testing" / "emulator_test.cpp", DRIVER_FLAGS))
    return units


def build(root: Path = ROOT, build_dir: Path | None = None, jobs: int = 2) -> Path:
    """Compiles what is not cached yet and links; returns the kernel test binary's path."""
    return _build(root, build_dir, jobs, _units(root), [], "cuda_emulator_test")


def build_op_layer(root: Path = ROOT, build_dir: Path | None = None, jobs: int = 2) -> Path:
    """The op layer's test binary (needs torch's headers and CPU library: torch_paths())."""
    found = torch_paths()
    if found is None:
        raise RuntimeError("torch's C++ headers and libtorch_cpu were not found")
    include, lib = found
    torch_flags = [f for d in include for f in ("-isystem", str(d))]
    version = (lib.parent / "version.py").read_bytes() if (lib.parent / "version.py").exists() else b""
    torch_flags.append("-DTORCHSPEC_TORCH_BUILD=" + hashlib.sha256(version).hexdigest()[:12])  # in the cache key
    units = [u for u in _units(root) if u[0].suffix == ".cu" or u[0].parent.name == "cpu"]
    units += [(root / "csrc" / name, OPS_FLAGS + torch_flags) for name in OPS_SOURCES]
    units.append((root / "csrc" / "testing" / "op_layer_test.cpp", OPS_FLAGS + torch_flags))
    libs = ["-fopenmp", f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
    return _build(root, build_dir, jobs, units, libs, "cuda_emulator_op_test")


def build_pipeline(root: Path = ROOT, build_dir: Path | None = None, jobs: int = 2) -> Path:
    """The NCCL transport's test binary (only a C++20 compiler)."""
    flags = ["-DTORCHSPEC_WITH_NCCL", "-I{root}/csrc/testing/fake_nccl"] + KERNEL_FLAGS
    units = [
        (root / "csrc" / "pipeline" / "nccl_comm.cpp", flags),
        (root / "csrc" / "testing" / "pipeline_test.cpp", flags + ["-Wno-missing-field-initializers"]),
    ]
    return _build(root, build_dir, jobs, units, ["-pthread"], "cuda_emulator_pipeline_test")


def _build(root: Path, build_dir: Path | None, jobs: int, units: list, libs: list[str], name: str) -> Path:
    build_dir = Path(build_dir or ROOT / "build" / "cuda_emulator")
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(f"{CXX} not found")
    common = hashlib.sha256()
    common.update(cxx.encode())
    for header in _headers(root):
        common.update(header.relative_to(root).as_posix().encode() + b"\0" + header.read_bytes())
    commands = []
    objects = []
    for source, extra in units:
        flags = BASE_FLAGS + [f.format(root=root) for f in extra]
        key = common.copy()
        key.update(" ".join(BASE_FLAGS + extra).encode() + b"\0" + source.read_bytes())
        obj = build_dir / "obj" / f"{source.stem}-{key.hexdigest()[:16]}.o"
        objects.append(obj)
        if not obj.exists():
            commands.append([cxx, *flags, "-c", str(source), "-o", str(obj) + ".tmp"])

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling for the CUDA emulator failed:\n{' '.join(cmd)}\n{done.stderr}")
        os.replace(cmd[-1], cmd[-1][: -len(".tmp")])

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, commands))
    key = " ".join(map(str, objects + libs))
    binary = build_dir / (name + "-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if not binary.exists():
        done = subprocess.run(
            [cxx, "-o", str(binary) + ".tmp", *map(str, objects), *libs], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulator test failed:\n{done.stderr}")
        os.replace(str(binary) + ".tmp", binary)
    return binary
