// The CUDA header cuda_runtime_api.h as the CPU emulator provides it (csrc/testing/cuda_emulator.h).
#pragma once
#include "../cuda_emulator.h"
