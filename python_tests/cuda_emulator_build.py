"""Build of the CUDA emulator test (csrc/testing/emulator_test.cpp): the CUDA kernel files compiled
as C++ against the emulator (csrc/testing/cuda_emulator.h), linked with their CPU twins.

Objects are cached in build/cuda_emulator/ under a hash of their source, every header they may
include and the flags, so a rerun, or a mutation of one kernel file (scripts/cuda_emulator_mutations.py),
recompiles only what changed. No torch and no CUDA toolkit are involved: only a C++20 compiler.
"""

from __future__ import annotations

import hashlib
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


def compiler() -> str | None:
    return shutil.which(CXX)


def _headers(root: Path) -> list[Path]:
    found = []
    for folder in ("common", "cpu", "kernels", "testing"):
        found += sorted(p for p in (root / "csrc" / folder).rglob("*") if p.suffix in (".h", ".cuh"))
    return found


def _units(root: Path) -> list[tuple[Path, list[str]]]:
    """(source, extra flags) of every object of the test binary."""
    units = [(p, ["-x", "c++"] + KERNEL_FLAGS) for p in sorted((root / "csrc" / "kernels").glob("*.cu"))]
    units += [(p, []) for p in sorted((root / "csrc" / "cpu").glob("*.cpp"))]
    units.append((root / "csrc" / "testing" / "emulator_test.cpp", DRIVER_FLAGS))
    return units


def build(root: Path = ROOT, build_dir: Path | None = None, jobs: int = 2) -> Path:
    """Compiles what is not cached yet and links; returns the test binary's path."""
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
    for source, extra in _units(root):
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
    binary = build_dir / ("cuda_emulator_test-" + hashlib.sha256(" ".join(map(str, objects)).encode()).hexdigest()[:16])
    if not binary.exists():
        done = subprocess.run([cxx, "-o", str(binary) + ".tmp", *map(str, objects)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulator test failed:\n{done.stderr}")
        os.replace(str(binary) + ".tmp", binary)
    return binary
