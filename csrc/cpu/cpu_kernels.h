// CPU kernels, framework-free: raw pointers in, results out. Each processes a range of rows so
// that the caller picks the threading (at::parallel_for in the op, std::thread in benchmarks).
#pragma once

#include <cstdint>

#include "../common/topk_lse.h"

namespace torchspec {
namespace cpu {

// Top-k of each row with its log-sum-exp, rows [row_begin, row_end) of p (see TopkLseParams).
void topk_lse_rows(const TopkLseParams& p, int64_t row_begin, int64_t row_end);

}  // namespace cpu
}  // namespace torchspec
