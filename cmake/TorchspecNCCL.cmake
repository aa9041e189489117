# Locating NCCL for bench_pipeline, as setup.py does for the extension: NCCL_HOME, else the
# nvidia-nccl wheel installed beside torch (site-packages/nvidia/nccl: it matches torch's CUDA
# major), else the system's. Sets include_var and library_var, or library_var to "" if not found.
function(torchspec_find_nccl include_var library_var)
  set(hints "")
  if(DEFINED ENV{NCCL_HOME})
    list(APPEND hints "$ENV{NCCL_HOME}")
  endif()
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
              "import importlib.util as u; s = u.find_spec('nvidia'); print(';'.join(p + '/nccl' for p in (s.submodule_search_locations or [])) if s else '')"
      OUTPUT_VARIABLE wheel_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    list(APPEND hints ${wheel_dirs})
  endif()
  find_path(TORCHSPEC_NCCL_INCLUDE_DIR nccl.h HINTS ${hints} PATH_SUFFIXES include)
  # The wheel ships only libnccl.so.2 (no unversioned libnccl.so for find_library's default names).
  find_library(TORCHSPEC_NCCL_LIB NAMES nccl libnccl.so.2 HINTS ${hints} PATH_SUFFIXES lib lib64)
  mark_as_advanced(TORCHSPEC_NCCL_INCLUDE_DIR TORCHSPEC_NCCL_LIB)
  if(TORCHSPEC_NCCL_INCLUDE_DIR AND TORCHSPEC_NCCL_LIB)
    set(${include_var} "${TORCHSPEC_NCCL_INCLUDE_DIR}" PARENT_SCOPE)
    set(${library_var} "${TORCHSPEC_NCCL_LIB}" PARENT_SCOPE)
  else()
    set(${library_var} "" PARENT_SCOPE)
  endif()
endfunction()
