"""Build of torchspec_ext's compiled core (torchspec_ext._C).

CUDA sources are compiled when a CUDA toolkit and a CUDA build of torch are both present; a
visible GPU is never required. Environment variables:

  TORCHSPEC_BUILD_CUDA=0|1   force a CPU-only build, or fail loudly if CUDA cannot be built
  CUDA_HOME / CUDA_PATH      the toolkit (else: nvcc on PATH, resolved through wrapper scripts,
                             else /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST       GPU architectures (default: the visible GPU's, else 9.0)
  NCCL_HOME                  NCCL headers/library (default: torch's own nvidia-nccl wheel)
  MAX_JOBS                   parallel compile jobs (default: from cores and memory)
  DEBUG=1                    -O0 -g build
"""

import glob
import importlib.util
import os
import re
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _resolve_nvcc(path, depth=0):
    """The real nvcc behind `path`: follows symlinks and small wrapper scripts that exec it."""
    real = Path(os.path.realpath(path))
    if depth > 4 or not real.is_file():
        return real
    with open(real, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return real
    match = re.search(rb"""exec\s+["']?([^\s"']*nvcc)["']?""", head)
    if match is None:
        return real
    return _resolve_nvcc(match.group(1).decode(), depth + 1)


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(_resolve_nvcc(Path(home) / "bin" / "nvcc").parent.parent)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(_resolve_nvcc(nvcc).parent.parent)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return str(Path(os.path.realpath("/usr/local/cuda")))
    return None


def _nvidia_wheel_dirs():
    """Folders of the nvidia-* wheels installed beside torch (site-packages/nvidia/...)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def find_header_dir(header, cuda_home):
    """A folder with `header` for torch's CUDA headers, when the toolkit lacks it (CUDA 13 wheels
    keep cuBLAS/cuSPARSE headers in site-packages/nvidia/cu13/include)."""
    if (Path(cuda_home) / "include" / header).exists():
        return None
    for base in _nvidia_wheel_dirs():
        for found in sorted(glob.glob(str(base / "*" / "include" / header))):
            return str(Path(found).parent)
    return None


def find_nccl(torch_cuda_major):
    """(include_dir, library_file) of the NCCL that matches torch's CUDA major, or None."""
    candidates = []
    if os.environ.get("NCCL_HOME"):
        home = Path(os.environ["NCCL_HOME"])
        candidates.append((home / "include", home / "lib"))
    for base in _nvidia_wheel_dirs():
        candidates.append((base / "nccl" / "include", base / "nccl" / "lib"))
    candidates.append((Path("/usr/include"), Path(f"/usr/lib/{os.uname().machine}-linux-gnu")))
    for include, lib in candidates:
        libs = sorted(glob.glob(str(lib / "libnccl.so*")))
        if (include / "nccl.h").exists() and libs:
            return str(include), libs[0]
    return None


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // 3)))  # nvcc on torch headers takes about 3 GB


def build_extensions():
    import torch

    force_cuda = _env_flag("TORCHSPEC_BUILD_CUDA")
    cuda_home = find_cuda_home() if force_cuda is not False else None
    with_cuda = force_cuda is not False and cuda_home is not None and torch.version.cuda is not None
    if force_cuda and not with_cuda:
        raise RuntimeError(
            "TORCHSPEC_BUILD_CUDA=1 but CUDA cannot be built: "
            f"toolkit={cuda_home or 'not found (set CUDA_HOME)'}, torch.version.cuda={torch.version.cuda} "
            "(install a CUDA build of torch)"
        )
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = bool(_env_flag("DEBUG"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-Wno-psabi", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP inline code
    nvcc_flags = opt + (["-lineinfo"] if debug else []) + ["--expt-relaxed-constexpr"]
    sources = sorted(
        glob.glob("csrc/*.cpp")
        + glob.glob("csrc/ops/*.cpp")
        + glob.glob("csrc/cpu/*.cpp")
        + glob.glob("csrc/pipeline/*.cpp")
    )
    define_macros = []
    extra_link_args = ["-fopenmp"]
    include_dirs = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/kernels/*.cu"))
        define_macros.append(("TORCHSPEC_WITH_CUDA", None))
        for extra in sorted({find_header_dir(h, cuda_home) for h in ("cublas_v2.h", "cusparse.h")} - {None}):
            cxx_flags += ["-idirafter", extra]  # after every -I: the toolkit's own headers win
        nccl = find_nccl(int(torch.version.cuda.split(".")[0]))
        if nccl is not None:
            include, library = nccl
            define_macros.append(("TORCHSPEC_WITH_NCCL", None))
            include_dirs.append(include)
            extra_link_args += [library, f"-Wl,-rpath,{os.path.dirname(library)}"]
        ext = CUDAExtension(
            "torchspec_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        ext = CppExtension(
            "torchspec_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    print(
        f"torchspec_ext: building {'with CUDA (' + cuda_home + ')' if with_cuda else 'CPU only'}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}"
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
