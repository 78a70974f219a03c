// The CPU attention both ops run (attention.cpp: every key; cross_attention.cpp: each batch row's valid
// leading keys): `attention_tiles`, with the fp32 row operations of its online softmax, chosen once at run
// time, and the loading of its blocks.
//
// Blocking: tasks of (head, batch row, query tiles of BLOCK_M rows) spread with at::parallel_for: all of a
// head's tiles when there are heads enough for every thread (a key block is then loaded, and widened, once
// per head), else one tile. Heads are outermost, so the contiguous task ranges each thread gets hold every
// batch row alike (cross-attention's rows differ in length: 20 keys against 1). Each tile walks its keys
// in blocks of BLOCK_N with an online softmax (running max and sum in fp32), so the score tile stays in L2
// for any key count; with one block (DiT's T = 256, any PixArt caption) the probabilities are normalised
// before p v, whose GEMM then writes finished rows, straight into the output for fp32. The GEMMs are
// cpu_common.h's (oneDNN brgemm), called inside the parallel region: they run on the calling thread, the
// parallelism is across tiles.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

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

constexpr int64_t BLOCK_M = 64;   // queries per tile: 4 tiles per head at T = 256
constexpr int64_t BLOCK_N = 512;  // keys per online-softmax step: one step for DiT's T = 256, any PixArt caption

struct Strides {
  int64_t b, h, t;  // batch, head and token strides of a (B, H, T, Dh) view
};

// o[b, h] = softmax(q[b, h] k[b, h, :n_b]^T * scale) v[b, h, :n_b], n_b = lens[b] (every T_k keys when lens
// is null). q, o (B, H, T_q, Dh), k, v (B, H, T_k, Dh): strided views, last dim contiguous, token strides of
// at least Dh, one dtype; scale > 0; lens in [1, T_k].
template <typename scalar_t>
void attention_tiles(const scalar_t* q, Strides sq, const scalar_t* k, Strides sk, const scalar_t* v, Strides sv,
                     scalar_t* o, Strides so, int64_t B, int64_t H, int64_t T_q, int64_t T_k, const int64_t* lens,
                     int64_t Dh, float scale) {
  constexpr bool widened = !std::is_same_v<scalar_t, float>;
  const RowOps ops = row_ops();
  const int64_t max_keys = lens ? *std::max_element(lens, lens + B) : T_k;
  const int64_t q_tiles = (T_q + BLOCK_M - 1) / BLOCK_M;
  const int64_t block_n = std::min(BLOCK_N, max_keys);
  const int64_t group = B * H >= 2 * at::get_num_threads() ? q_tiles : 1;  // query tiles per task
  const int64_t groups = (q_tiles + group - 1) / group;
  const int64_t group_rows = std::min(group * BLOCK_M, T_q);
  at::parallel_for(0, H * B * groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch (64-byte aligned by ATen's allocator), reused by every task of the range.
    at::Tensor s_buf = at::empty({BLOCK_M, block_n}, at::kFloat);  // scores, then probabilities
    at::Tensor acc_buf = at::empty({group_rows, Dh}, at::kFloat);  // unnormalised p v
    // k transposed (fp32); q and v widened (bf16 / fp16 only)
    at::Tensor wide_buf = at::empty({block_n + (widened ? BLOCK_M + block_n : 0), Dh}, at::kFloat);
    float* s = s_buf.data_ptr<float>();
    float* acc_all = acc_buf.data_ptr<float>();
    float* k_t = wide_buf.data_ptr<float>();
    float* q_wide = k_t + block_n * Dh;
    float* v_wide = q_wide + BLOCK_M * Dh;
    std::vector<float> m_all(group_rows), l_all(group_rows);  // running max and sum per query row

    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / (B * groups), b = task / groups % B, g = task % groups;
      const int64_t n_keys = lens ? lens[b] : T_k;
      const bool one_block = n_keys <= block_n;
      const int64_t g0 = g * group * BLOCK_M, g1 = std::min(T_q, g0 + group * BLOCK_M);  // query rows [g0, g1)
      const scalar_t* k_head = k + b * sk.b + h * sk.h;  // (n_keys, Dh), row stride sk.t
      const scalar_t* v_head = v + b * sv.b + h * sv.h;
      scalar_t* o_head = o + b * so.b + h * so.h;  // (T_q, Dh), row stride so.t

      for (int64_t n0 = 0; n0 < n_keys; n0 += block_n) {
        const int64_t cols = std::min(block_n, n_keys - n0);
        const bool first = n0 == 0;
        int64_t ldq, ldv;
        load_transposed(k_head + n0 * sk.t, cols, Dh, sk.t, k_t);  // (Dh, cols)
        const float* v_blk = as_fp32(v_head + n0 * sv.t, cols, Dh, sv.t, v_wide, ldv);  // (cols, Dh)
        for (int64_t r0 = g0; r0 < g1; r0 += BLOCK_M) {
          const int64_t rows = std::min(BLOCK_M, g1 - r0);
          const float* q_tile = as_fp32(q + b * sq.b + h * sq.h + r0 * sq.t, rows, Dh, sq.t, q_wide, ldq);
          float* acc = acc_all + (r0 - g0) * Dh;  // (rows, Dh)
          float* row_m = m_all.data() + (r0 - g0);
          float* row_l = l_all.data() + (r0 - g0);
          gemm(false, rows, cols, Dh, 1.f, q_tile, ldq, k_t, cols, 0.f, s, block_n);  // raw q.k (rows, cols)
          for (int64_t i = 0; i < rows; ++i) {
            float* s_row = s + i * block_n;
            const float m_blk = ops.row_max(s_row, cols) * scale;  // = the max of the scaled row (scale > 0)
            const float m_new = first ? m_blk : std::max(row_m[i], m_blk);
            const float sum = ops.exp_sum(s_row, cols, m_new, scale);
            if (one_block) {  // a NaN row (its sum NaN) stays NaN, and only this row
              const float inv_l = 1.f / sum;
              for (int64_t j = 0; j < cols; ++j) s_row[j] *= inv_l;
            } else if (first) {
              row_l[i] = sum;
            } else {  // rescale what earlier key blocks accumulated to the new running max
              const float alpha = std::exp(row_m[i] - m_new);
              row_l[i] = row_l[i] * alpha + sum;
              float* acc_row = acc + i * Dh;
              for (int64_t d = 0; d < Dh; ++d) acc_row[d] *= alpha;
            }
            row_m[i] = m_new;
          }
          // beta = 0 on the first block: the destination is not read, so stale values (or NaN) never leak in.
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (one_block) {
              gemm(false, rows, Dh, cols, 1.f, s, block_n, v_blk, ldv, 0.f, o_head + r0 * so.t, so.t);
              continue;
            }
          }
          gemm(false, rows, Dh, cols, 1.f, s, block_n, v_blk, ldv, first ? 0.f : 1.f, acc, Dh);  // (rows, Dh)
        }
      }

      if (one_block && std::is_same_v<scalar_t, float>) continue;  // written by the GEMM
      for (int64_t r = g0; r < g1; ++r) {
        float* acc_row = acc_all + (r - g0) * Dh;
        if (!one_block) {
          const float inv_l = 1.f / l_all[r - g0];
          for (int64_t d = 0; d < Dh; ++d) acc_row[d] *= inv_l;
        }
        narrow(acc_row, o_head + r * so.t, Dh);
      }
    }
  });
}

}  // namespace cpu
}  // namespace ditengine
