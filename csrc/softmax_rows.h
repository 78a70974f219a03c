// What the two CPU attention kernels (attention.cpp, cross_attention.cpp) share: the fp32 row operations
// of their online softmax, chosen once at run time, and the widening of a block of rows to fp32.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_common.h"
#include "cpu.h"  // after cpu_common.h: both define DITENGINE_X86 (cpu.h as 0 off x86-64, so test it with #if)

namespace ditengine {
namespace cpu {

// exp() dominates the non-GEMM time (a score per query and key), so it is vectorised: AVX-512 or AVX2 + FMA,
// chosen at run time (no -march flags at build time) and capped by DITENGINE_ISA. The scalar loops are the
// portable fallback.
inline float row_max_scalar(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] * scale - m) for raw scores s and the scaled row max m, the reference's rounding (the
// logits q.k * scale, less their max); returns the row sum. A NaN score stays NaN (so does the row's sum).
inline float exp_sum_scalar(float* s, int64_t n, float m, float scale) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - m);
    sum += s[j];
  }
  return sum;
}

#if DITENGINE_X86
DITENGINE_AVX2 inline float row_max_avx2(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float out = lanes[0];
  for (int i = 1; i < 8; ++i) out = std::max(out, lanes[i]);
  for (; j < n; ++j) out = std::max(out, s[j]);
  return out;
}

// The tail (rows shorter than 8 past a multiple of 8, or shorter than 8 in all, as PixArt's often are)
// goes through a masked load and the same polynomial as the body.
DITENGINE_AVX2 inline float exp_sum_avx2(float* s, int64_t n, float m, float scale) {
  const __m256 mv = _mm256_set1_ps(m), sv = _mm256_set1_ps(scale);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp256(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), sv), mv));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  if (j < n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), lane);
    __m256 p = exp256(_mm256_sub_ps(_mm256_mul_ps(_mm256_maskload_ps(s + j, mask), sv), mv));
    p = _mm256_and_ps(p, _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(s + j, mask, p);
    acc = _mm256_add_ps(acc, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

DITENGINE_AVX512F inline float row_max_avx512(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
  if (j < n) m = _mm512_mask_max_ps(m, static_cast<__mmask16>((1u << (n - j)) - 1), m, _mm512_loadu_ps(s + j));
  return _mm512_reduce_max_ps(m);
}

// 16 lanes, the tail through a masked load; lanes summed pairwise as in the AVX2 form.
DITENGINE_AVX512F inline float exp_sum_avx512(float* s, int64_t n, float m, float scale) {
  const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(scale);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), sv), mv));
    _mm512_storeu_ps(s + j, p);
    acc = _mm512_add_ps(acc, p);
  }
  if (j < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 p = exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), sv), mv));
    _mm512_mask_storeu_ps(s + j, mask, p);
    acc = _mm512_mask_add_ps(acc, mask, acc, p);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}
#endif

struct RowOps {
  float (*row_max)(const float*, int64_t);
  float (*exp_sum)(float*, int64_t, float, float);
};

inline RowOps row_ops() {
#if DITENGINE_X86
  if (isa() == Isa::avx512) return {row_max_avx512, exp_sum_avx512};
  if (cpu_has_avx2_fma() && isa() != Isa::baseline) return {row_max_avx2, exp_sum_avx2};
#endif
  return {row_max_scalar, exp_sum_scalar};
}

// Rows of a (rows, Dh) block with row stride `ld` as fp32 (the GEMMs' operand): fp32 is read in place,
// bf16 / fp16 widened into `scratch` (row stride Dh), block by block, so the copy stays in L1/L2 and costs
// no pass over memory.
template <typename in_t>
const float* as_fp32(const in_t* src, int64_t rows, int64_t Dh, int64_t ld, float* scratch, int64_t& ld_out) {
  if constexpr (std::is_same_v<in_t, float>) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t i = 0; i < rows; ++i) widen(src + i * ld, scratch + i * Dh, Dh);
    ld_out = Dh;
    return scratch;
  }
}

// k (cols x Dh, row stride ld) -> dst (Dh x cols) in fp32: the scores GEMM's B operand, k transposed. In
// 16 x 16 tiles, so the 16 destination rows a tile writes stay in L1: element by element, every store
// touched another cache line, and the transpose took a fifth of the attention's time.
template <typename in_t>
void load_transposed(const in_t* src, int64_t cols, int64_t Dh, int64_t ld, float* dst) {
  constexpr int64_t TILE = 16;
  for (int64_t j0 = 0; j0 < cols; j0 += TILE)
    for (int64_t d0 = 0; d0 < Dh; d0 += TILE) {
      const int64_t j1 = std::min(cols, j0 + TILE), d1 = std::min(Dh, d0 + TILE);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t d = d0; d < d1; ++d) dst[d * cols + j] = static_cast<float>(src[j * ld + d]);
    }
}

}  // namespace cpu
}  // namespace ditengine
