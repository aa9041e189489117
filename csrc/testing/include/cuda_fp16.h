// The CUDA header cuda_fp16.h as the CPU emulator provides it (csrc/testing/cuda_emulator.h).
#pragma once
#include "../cuda_emulator.h"
