// CPU attention for DiT, registered as the CPU kernel of `ditengine::attention` (defined in
// kernels/attention.py, whose Python body stays the fallback and the reference of its semantics).
//
//     out = softmax(q k^T * softmax_scale) v        non-causal, softmax in fp32
//
// q, k, v arrive as (B, H, T, Dh) strided views; in DiT they view the qkv projection's packed
// (B, T, 3, H, Dh) output, so a head's rows are 3*H*Dh elements apart. The GEMMs read them in place
// through their leading dimension: no permute, no copy. The output is written (B, T, H, Dh) when
// `tokens_first` (the output projection's input layout), else (B, H, T, Dh).
//
// Blocking: tasks of (batch, head, query tiles of BLOCK_M rows) spread with at::parallel_for: all of a
// head's tiles when there are heads enough for every thread (a key block is then loaded once per head),
// else one tile. Each tile walks the keys in blocks of BLOCK_N with an online softmax (running max and sum
// in fp32), so the score tile (BLOCK_M x BLOCK_N fp32) stays in L2 for any T. A BLAS called inside the
// OpenMP region runs on the calling thread, which is the intent: the parallelism is across tiles.
//
// Dot products run in fp32: bf16 (and fp16) blocks are widened as they are loaded. On CPUs without bf16 dot
// instructions (AVX2: no avx512_bf16, no AMX) a bf16 GEMM is emulated through fp32 and measures ~6x slower
// than the fp32 GEMM at DiT shapes, so fp32 dots are both the fastest and the most precise choice there;
// the output is rounded to the input dtype once, at the end.
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

constexpr int64_t BLOCK_M = 64;   // queries per tile: 4 tiles per head at T = 256
constexpr int64_t BLOCK_N = 512;  // keys per online-softmax step: one step for DiT's T = 256

// -- the kernel ----------------------------------------------------------------------------------------
struct Strides {
  int64_t b, h, t;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// q (B, H, T_q, Dh), k and v (B, H, T_k, Dh), o (B, H, T_q, Dh): strided, last dim contiguous, one dtype.
template <typename scalar_t>
void attention_kernel(const scalar_t* q, Strides sq, const scalar_t* k, Strides sk, const scalar_t* v, Strides sv,
                      scalar_t* o, Strides so, int64_t B, int64_t H, int64_t T_q, int64_t T_k, int64_t Dh,
                      float scale) {
  constexpr bool widened = !std::is_same_v<scalar_t, float>;
  const RowOps ops = row_ops();
  const int64_t q_tiles = (T_q + BLOCK_M - 1) / BLOCK_M;
  const int64_t block_n = std::min(BLOCK_N, T_k);
  // With heads enough to keep every thread busy (DiT: B*H >= 12), a task takes all query tiles of a head,
  // so each key block is read (and widened) once per head rather than once per query tile.
  const int64_t group = B * H >= 2 * at::get_num_threads() ? q_tiles : 1;  // query tiles per task
  const int64_t groups = (q_tiles + group - 1) / group;
  const int64_t group_rows = std::min(group * BLOCK_M, T_q);
  at::parallel_for(0, B * H * groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch (64-byte aligned by ATen's allocator), reused by every task of the range.
    at::Tensor s_buf = at::empty({BLOCK_M, block_n}, at::kFloat);    // scores, then probabilities
    at::Tensor acc_buf = at::empty({group_rows, Dh}, at::kFloat);    // unnormalised p v
    // k transposed (fp32); q and v widened (bf16 / fp16 only)
    at::Tensor wide_buf = at::empty({block_n + (widened ? BLOCK_M + block_n : 0), Dh}, at::kFloat);
    float* s = s_buf.data_ptr<float>();
    float* acc_all = acc_buf.data_ptr<float>();
    float* k_t = wide_buf.data_ptr<float>();
    float* q_wide = k_t + block_n * Dh;
    float* v_wide = q_wide + BLOCK_M * Dh;
    std::vector<float> m_all(group_rows), l_all(group_rows);  // running max and sum per query row

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / groups, g = task % groups;
      const int64_t b = bh / H, h = bh % H;
      const int64_t g0 = g * group * BLOCK_M, g1 = std::min(T_q, g0 + group * BLOCK_M);  // query rows [g0, g1)
      const scalar_t* k_head = k + b * sk.b + h * sk.h;  // (T_k, Dh), row stride sk.t
      const scalar_t* v_head = v + b * sv.b + h * sv.h;  // (T_k, Dh), row stride sv.t

      for (int64_t n0 = 0; n0 < T_k; n0 += block_n) {
        const int64_t cols = std::min(block_n, T_k - n0);
        const bool first = n0 == 0;
        int64_t ldq, ldv;
        cpu::load_transposed(k_head + n0 * sk.t, cols, Dh, sk.t, k_t);  // (Dh, cols)
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
            if (first) {
              row_l[i] = sum;
            } else {  // rescale what earlier key blocks accumulated to the new running max
              const float alpha = std::exp(row_m[i] - m_new);
              row_l[i] = row_l[i] * alpha + sum;
              float* acc_row = acc + i * Dh;
              for (int64_t d = 0; d < Dh; ++d) acc_row[d] *= alpha;
            }
            row_m[i] = m_new;
          }
          // beta = 0 on the first block: the scratch is not read, so stale values (or NaN) never leak in.
          gemm(false, rows, Dh, cols, 1.f, s, block_n, v_blk, ldv, first ? 0.f : 1.f, acc, Dh);  // (rows, Dh)
        }
      }

      scalar_t* o_rows = o + b * so.b + h * so.h;
      for (int64_t r = g0; r < g1; ++r) {
        const float inv_l = 1.f / l_all[r - g0];
        float* acc_row = acc_all + (r - g0) * Dh;
        for (int64_t d = 0; d < Dh; ++d) acc_row[d] *= inv_l;
        cpu::narrow(acc_row, o_rows + r * so.t, Dh);
      }
    }
  });
}

void check_input(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "ditengine::attention: ", name, " must be (B, H, T, Dh), got ", t.dim(),
              " dimensions with shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "ditengine::attention (CPU kernel): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "ditengine::attention: ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "ditengine::attention: ", name,
              ": the last dimension (Dh) must be contiguous, got strides ", t.strides());
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double softmax_scale,
                         bool tokens_first, bool head_split) {
  (void)head_split;  // a Triton block choice; the CPU GEMMs take any head dim
  check_input("q", q, q);
  check_input("k", k, q);
  check_input("v", v, q);
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2), Dh = q.size(3), T_k = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == Dh, "ditengine::attention: k ", k.sizes(),
              " must match q ", q.sizes(), " in batch, heads and head dim");
  TORCH_CHECK(v.sizes() == k.sizes(), "ditengine::attention: v ", v.sizes(), " must have k's shape ", k.sizes());
  TORCH_CHECK(T_k > 0, "ditengine::attention: k and v need at least one token");
  TORCH_CHECK(Dh > 0, "ditengine::attention: the head dim must be positive");

  // Rows overlapping in memory (a token stride below Dh, e.g. an expanded k) are materialised: BLAS needs
  // a leading dimension of at least Dh.
  auto rows_apart = [Dh](const at::Tensor& t) { return t.size(2) <= 1 || t.stride(2) >= Dh ? t : t.contiguous(); };
  const at::Tensor qr = rows_apart(q), kr = rows_apart(k), vr = rows_apart(v);
  const auto dtype = q.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) || !(softmax_scale > 0)) {
    // float64 and anything else: the op's Python fallback runs SDPA; so does this kernel. So does a scale that
    // is not positive (the row max of the scaled scores is taken as the raw max times the scale).
    at::Tensor out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, softmax_scale);
    return tokens_first ? out.transpose(1, 2).contiguous() : out.contiguous();
  }
  at::Tensor out = tokens_first ? at::empty({B, T_q, H, Dh}, q.options()) : at::empty({B, H, T_q, Dh}, q.options());
  if (out.numel() == 0) return out;
  at::Tensor o = tokens_first ? out.transpose(1, 2) : out;  // (B, H, T, Dh) view of the output
  const float scale = static_cast<float>(softmax_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_attention_cpu", [&] {
    attention_kernel<scalar_t>(qr.data_ptr<scalar_t>(), strides_of(qr), kr.data_ptr<scalar_t>(), strides_of(kr),
                               vr.data_ptr<scalar_t>(), strides_of(vr), o.data_ptr<scalar_t>(), strides_of(o), B, H,
                               T_q, T_k, Dh, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ditengine, CPU, m) { m.impl("attention", &attention_cpu); }

// The ops have no backward; torch's C++ fallback keeps autograd out of the per-call path (the Python one costs
// far more than these kernels on small inputs).
TORCH_LIBRARY_IMPL(ditengine, AutogradCPU, m) {
  m.impl("attention", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace ditengine
