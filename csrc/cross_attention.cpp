// CPU cross-attention to a right-padded text, registered as the CPU kernel of `ditengine::cross_attention`
// (defined in kernels/cross_attention.py, whose Python body stays the fallback and the reference of its
// semantics).
//
//     out[b] = softmax(q[b] k[b, :len_b]^T * softmax_scale) v[b, :len_b]        softmax in fp32
//
// q (B, Tq, H, Dh) is the q projection's (B, Tq, H*Dh) output viewed per head; kv (B, L, 2, H, Dh) the
// packed k/v projection of the caption; kv_lens (B,) the valid leading keys of each row, in [1, L]. Both
// are read in place through their strides (a head's rows are H*Dh and 2*H*Dh elements apart): no permute,
// no copy. The output is written (B, Tq, H, Dh), contiguous: the output projection's input layout.
//
// Only the first len_b keys of row b are read: the padding is neither computed nor loaded (whatever it
// holds, NaN included, cannot reach the output), and a one-token negative prompt costs one key. PixArt's
// captions pad to L = 120 or 300 with often ~20 valid tokens, so this is most of the saving over SDPA
// with a boolean mask, which computes every padded score.
//
// Blocking as csrc/attention.cpp: tasks of (head, batch, query tiles of BLOCK_M rows) spread with
// at::parallel_for, all of a head's tiles per task when there are heads enough for every thread (its keys
// are then loaded, and widened, once); heads outermost, so the contiguous task ranges at::parallel_for
// hands each thread hold every batch row alike (the rows' lengths differ: 20 keys against 1). Each tile
// walks its row's keys in blocks of up to BLOCK_N with an online softmax (running max and sum in fp32);
// the GEMMs are the fp32 BLAS tiles of cpu_common.h, the exp its AVX2 polynomial (chosen at run time,
// capped by DITENGINE_ISA=baseline). bf16 / fp16 blocks are widened to fp32 as they are loaded and the
// output rounded once, at the end (see csrc/attention.cpp for why fp32 dots are the fast choice here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "softmax_rows.h"

namespace ditengine {
namespace {

using cpu::as_fp32;
using cpu::gemm;
using cpu::row_ops;
using cpu::RowOps;

constexpr int64_t BLOCK_M = 64;   // queries per tile: 4 tiles per head at PixArt's 256 px (T = 256)
constexpr int64_t BLOCK_N = 512;  // keys per online-softmax step: one step for any PixArt caption (L <= 300)

// -- the kernel ----------------------------------------------------------------------------------------
struct Strides {
  int64_t b, t, h;  // batch, token and head strides of a (B, T, ..., H, Dh) operand
};

// q (B, Tq, H, Dh), k and v (B, L, H, Dh) (the two halves of kv), o (B, Tq, H, Dh): strided, last dim
// contiguous, one dtype. lens: B values in [1, L], max_len their maximum.
template <typename scalar_t>
void cross_attention_kernel(const scalar_t* q, Strides sq, const scalar_t* k, const scalar_t* v, Strides skv,
                            scalar_t* o, Strides so, const std::vector<int64_t>& lens, int64_t max_len, int64_t B,
                            int64_t H, int64_t T_q, int64_t Dh, float scale) {
  constexpr bool widened = !std::is_same_v<scalar_t, float>;
  const RowOps ops = row_ops();
  const int64_t q_tiles = (T_q + BLOCK_M - 1) / BLOCK_M;
  const int64_t block_n = std::min(BLOCK_N, max_len);
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
      const int64_t n_keys = lens[b];
      // One key block (any PixArt caption): the probabilities are normalised before p v, whose GEMM then
      // writes the finished rows, straight into the output for fp32.
      const bool one_block = n_keys <= block_n;
      const int64_t g0 = g * group * BLOCK_M, g1 = std::min(T_q, g0 + group * BLOCK_M);  // query rows [g0, g1)
      const scalar_t* k_head = k + b * skv.b + h * skv.h;  // (n_keys, Dh), row stride skv.t
      const scalar_t* v_head = v + b * skv.b + h * skv.h;
      scalar_t* o_head = o + b * so.b + h * so.h;  // (T_q, Dh), row stride so.t

      for (int64_t n0 = 0; n0 < n_keys; n0 += block_n) {
        const int64_t cols = std::min(block_n, n_keys - n0);
        const bool first = n0 == 0;
        int64_t ldq, ldv;
        cpu::load_transposed(k_head + n0 * skv.t, cols, Dh, skv.t, k_t);  // (Dh, cols)
        const float* v_blk = as_fp32(v_head + n0 * skv.t, cols, Dh, skv.t, v_wide, ldv);  // (cols, Dh)
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
        cpu::narrow(acc_row, o_head + r * so.t, Dh);
      }
    }
  });
}

constexpr const char* OP = "ditengine::cross_attention";

void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), OP, " (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
}

at::Tensor cross_attention_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kv_lens,
                               double softmax_scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, OP, ": q must be (B, Tq, H, Dh), got ", q.dim(), " dimensions with shape ",
                    q.sizes());
  const int64_t B = q.size(0), T_q = q.size(1), H = q.size(2), Dh = q.size(3);
  TORCH_CHECK_VALUE(kv.dim() == 5 && kv.size(0) == B && kv.size(2) == 2 && kv.size(3) == H && kv.size(4) == Dh, OP,
                    ": kv must be (B, L, 2, H, Dh) with q's batch, heads and head dim (", B, ", *, 2, ", H, ", ", Dh,
                    "), got shape ", kv.sizes());
  TORCH_CHECK_VALUE(kv_lens.dim() == 1 && kv_lens.size(0) == B, OP, ": kv_lens must be (B,) = (", B,
                    ",), got shape ", kv_lens.sizes());
  check_cpu("q", q);
  check_cpu("kv", kv);
  check_cpu("kv_lens", kv_lens);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, OP,
                   ": q must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(kv.scalar_type() == dtype, OP, ": kv has dtype ", kv.scalar_type(), " but q has ", dtype);
  TORCH_CHECK_TYPE(kv_lens.scalar_type() == at::kInt || kv_lens.scalar_type() == at::kLong, OP,
                   ": kv_lens must be int32 or int64, got ", kv_lens.scalar_type());
  TORCH_CHECK_VALUE(Dh <= 1 || q.stride(3) == 1, OP, ": q: the last dimension (Dh) must be contiguous, got strides ",
                    q.strides());
  TORCH_CHECK_VALUE(Dh <= 1 || kv.stride(4) == 1, OP,
                    ": kv: the last dimension (Dh) must be contiguous, got strides ", kv.strides());
  const int64_t L = kv.size(1);
  TORCH_CHECK_VALUE(L > 0, OP, ": kv needs at least one key (L = 0)");
  TORCH_CHECK_VALUE(Dh > 0, OP, ": the head dim must be positive");

  // The lengths, read once here (a CPU tensor: no device sync), checked, and the largest one kept.
  const at::Tensor lens_t = kv_lens.to(at::kLong).contiguous();
  const std::vector<int64_t> lens(lens_t.data_ptr<int64_t>(), lens_t.data_ptr<int64_t>() + B);
  int64_t min_len = L, max_len = 1;
  for (int64_t n : lens) min_len = std::min(min_len, n), max_len = std::max(max_len, n);
  TORCH_CHECK_VALUE(B == 0 || (min_len >= 1 && max_len <= L), OP, ": kv_lens: expected values in [1, ", L,
                    "] (the valid keys of each row), got [", min_len, ", ", max_len, "]");

  if (dtype == at::kDouble || !(softmax_scale > 0)) {  // the op's Python body: SDPA with a boolean key mask
    // (also for a scale that is not positive: the kernel takes the scaled row max as the raw max times it)
    const at::Tensor valid = at::arange(L, kv_lens.options().dtype(at::kLong)).unsqueeze(0) < lens_t.unsqueeze(1);
    at::Tensor out = at::scaled_dot_product_attention(
        q.transpose(1, 2), kv.select(2, 0).transpose(1, 2), kv.select(2, 1).transpose(1, 2),
        valid.view({B, 1, 1, L}), 0.0, false, softmax_scale);
    return out.transpose(1, 2).contiguous();
  }
  at::Tensor out = at::empty({B, T_q, H, Dh}, q.options());
  if (out.numel() == 0) return out;
  // Rows overlapping in memory (a token stride below Dh, e.g. an expanded q or kv) are materialised: BLAS
  // needs a leading dimension of at least Dh.
  const at::Tensor qr = T_q <= 1 || q.stride(1) >= Dh ? q : q.contiguous();
  const at::Tensor kvr = L <= 1 || kv.stride(1) >= Dh ? kv : kv.contiguous();
  const Strides sq{qr.stride(0), qr.stride(1), qr.stride(2)};
  const Strides skv{kvr.stride(0), kvr.stride(1), kvr.stride(3)};
  const Strides so{out.stride(0), out.stride(1), out.stride(2)};
  const float scale = static_cast<float>(softmax_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_cross_attention_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t* kv_ptr = kvr.data_ptr<scalar_t>();
      cross_attention_kernel<scalar_t>(qr.data_ptr<scalar_t>(), sq, kv_ptr, kv_ptr + kvr.stride(2), skv,
                                       out.data_ptr<scalar_t>(), so, lens, max_len, B, H, T_q, Dh, scale);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditengine, CPU, m) { m.impl("cross_attention", &cross_attention_cpu); }

// No backward; torch's C++ fallback keeps autograd out of the per-call path (see csrc/attention.cpp).
TORCH_LIBRARY_IMPL(ditengine, AutogradCPU, m) {
  m.impl("cross_attention", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ditengine
