// The GEMM epilogue of the CPU linear kernels (linear_gelu.cpp, linear_int8.cpp): bias and the tanh GELU on
// an fp32 row (or a tile's part of one) while it is in cache,
//
//     gelu_tanh(y) = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) = y * sigmoid(2 sqrt(2/pi) (y + 0.044715 y^3))
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_common.h"
#include "cpu.h"  // after cpu_common.h (see softmax_rows.h)

namespace ditengine {
namespace {

constexpr float GELU_K0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float GELU_K1 = 0.044715f;

// y[j] = gelu_tanh(y[j] + bias[j]) in place (bias may be null). As y * sigmoid(2u): no cancellation near
// zero, and a NaN input stays NaN.
inline void bias_gelu_scalar(float* y, const float* bias, int64_t n, bool apply_gelu) {
  for (int64_t j = 0; j < n; ++j) {
    float v = y[j] + (bias ? bias[j] : 0.f);
    if (apply_gelu) v = 0.5f * v * (1.f + std::tanh(GELU_K0 * (v + GELU_K1 * v * v * v)));
    y[j] = v;
  }
}

#if DITENGINE_X86
DITENGINE_AVX2 inline __m256 gelu_tanh256(__m256 y) {
  const __m256 y3 = _mm256_mul_ps(_mm256_mul_ps(y, y), y);
  const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(-2.f * GELU_K0), _mm256_fmadd_ps(_mm256_set1_ps(GELU_K1), y3, y));
  // y / (1 + exp(-2u)); exp saturates at ~1e38 for very negative y, giving -0 rather than NaN.
  return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.f), cpu::exp256(u2)));
}

DITENGINE_AVX2 inline void bias_gelu_avx2(float* y, const float* bias, int64_t n, bool apply_gelu) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(y + j);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    if (apply_gelu) v = gelu_tanh256(v);
    _mm256_storeu_ps(y + j, v);
  }
  bias_gelu_scalar(y + j, bias ? bias + j : nullptr, n - j, apply_gelu);
}

DITENGINE_AVX512F inline void bias_gelu_avx512(float* y, const float* bias, int64_t n, bool apply_gelu) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_loadu_ps(y + j);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    if (apply_gelu) {
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u2 = _mm512_mul_ps(_mm512_set1_ps(-2.f * GELU_K0), _mm512_fmadd_ps(_mm512_set1_ps(GELU_K1), v3, v));
      v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), cpu::exp512(u2)));
    }
    _mm512_storeu_ps(y + j, v);
  }
  bias_gelu_avx2(y + j, bias ? bias + j : nullptr, n - j, apply_gelu);
}
#endif

using EpilogueFn = void (*)(float*, const float*, int64_t, bool);

// By the ISA the kernels run (DITENGINE_ISA caps it).
inline EpilogueFn epilogue() {
#if DITENGINE_X86
  if (cpu::isa() == cpu::Isa::avx512) return bias_gelu_avx512;
  if (cpu::isa() == cpu::Isa::avx2) return bias_gelu_avx2;
#endif
  return bias_gelu_scalar;
}

// Bias on y's n columns, GELU on those from `gelu_from` on (relative to y, clamped to 0..n): a tile that
// straddles the boundary runs the two parts; either may be empty. The GELU part starts at any column, so
// the vector variants' unaligned loads and scalar tails cover it.
inline void bias_gelu_cols(EpilogueFn finish, float* y, const float* bias, int64_t n, int64_t gelu_from) {
  const int64_t split = std::min(std::max(gelu_from, int64_t{0}), n);
  if (split > 0) finish(y, bias, split, false);
  if (split < n) finish(y + split, bias ? bias + split : nullptr, n - split, true);
}

}  // namespace
}  // namespace ditengine
