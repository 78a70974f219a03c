// CPU attention with grouped key/value heads, a q/k RMSNorm + RoPE prologue and a sliding window, registered
// as the CPU kernel of `ditengine::gqa_attention` (defined in kernels/gqa_attention.py, whose Python body stays
// the fallback and whose reference states the semantics).
//
//     q' = rope(rmsnorm(q) * w_q),  k' = rope(rmsnorm(k) * w_k)         each step optional
//     out[b, i, h] = softmax_j(q'[b, i, h] . k'[b, j, g] * scale) v[b, j, g],  g = h / (Hq / Hkv),  |i - j| <= W
//
// q (B, T, Hq, Dh) and k, v (B, S, Hkv, Dh) are per-head views of the projections (ACE-Step: column slices of
// one fused (B, T, (Hq + 2 Hkv) Dh) output), read in place through their strides; out (B, T, Hq, Dh),
// contiguous.
//
// Joint attention (SD3.5, Flux.1): a norm weight may be (2, Dh), one per stream of the concatenated sequence;
// the row at position i < norm_split normalises with weight 0, the others with weight 1. The weight is picked
// per row inside the prologue, so a tile across the split needs nothing else.
//
// Blocking: a task is (batch row, kv head, run of query tiles of BLOCK_M rows), spread with at::parallel_for:
// as many tiles per task as leave two tasks per thread (a kv head's every tile when there are kv heads enough
// for every thread). A task normalises, rotates and transposes the keys its tiles see once, into an fp32
// buffer (Dh, keys) that the scores GEMMs read through their leading dimension (csrc/softmax_rows.h's
// `load_transposed` where there is no prologue), and serves every q head of the kv head's group from it: GQA
// by indexing, no K/V copy per q head. A q tile's rows go through the prologue once per tile and head, into
// the GEMM's A operand. With a window, a tile walks only the keys [r0 - W, r1 + W) its rows can see (at
// W = 128, BLOCK_M = 64: 320 of ACE-Step's 375 tokens at 30 s, 320 of 3000 at 4 min), and each row's softmax
// runs over its own contiguous slice of a key block, the rest of the row's probabilities set to 0. Key blocks
// of up to BLOCK_N with an online softmax (running max and sum in fp32); a range of one block normalises the
// probabilities before p v, whose GEMM then writes finished fp32 rows straight into the output. The GEMMs and
// the vectorised row operations (exp, max: AVX-512 / AVX2 / scalar by cpu::isa()) are softmax_rows.h's, shared
// with attention.cpp and cross_attention.cpp.
//
// Precision: everything in fp32, bf16 / fp16 rows widened as they are loaded and the output rounded once (see
// csrc/attention.cpp for why fp32 dots are also the fast choice here). The prologue is a few multiplies per
// element against the 4 * G * BLOCK_M multiply-adds per key element of the GEMMs, so it is one baseline loop
// (the compiler's SSE vectorisation) rather than one variant per ISA. bf16 on AMX without a window runs the
// prologue once per row and then ATen's flash attention instead (cpu_common.h's `bf16_tiles_in_hardware`).
//
// Log-sum-exp (`ditengine::gqa_attention_lse`, the same kernel): lse[b, i, h] = log sum_j exp(score_ij), the
// natural log over the keys row i sees, (B, T, Hq) fp32, from the online softmax's running max and sum per row
// (m + log(l): the scores are scaled before the max, so m is in the lse's units). A key shard of padding (S = 0)
// gives out 0 and lse -inf. Ring attention merges such partial results (kernels/gqa_attention.py's
// merge_attention). The AMX branch takes the lse from ATen's flash kernel, which computes the same.
//
// NaN: a NaN in a q row stays in that output row; a NaN in a k row reaches the queries whose band holds that
// key (its score is overwritten by 0 for the others); a NaN in a v row also reaches the other rows of a tile
// whose key block holds it (0 * NaN in p v).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "checks.h"
#include "registration.h"
#include "softmax_rows.h"

namespace ditengine {
namespace {

using cpu::BLOCK_M;
using cpu::BLOCK_N;
using cpu::kLanes;
using cpu::Strides;

// The row transform of q or k: RMSNorm with a weight, then RoPE; either may be absent.
struct Prologue {
  const float* weight = nullptr;  // (Dh,) fp32; null: no norm
  const float* weight2 = nullptr;  // the second stream's (Dh,) fp32 weight, for positions >= split; null: none
  int64_t split = 0;
  float eps = 0.f;
  const float* cos = nullptr;  // (T, Dh) fp32 rows, row strides below; null: no RoPE
  const float* sin = nullptr;
  int64_t stride_cos = 0, stride_sin = 0;
  bool interleaved = false;  // pairs (2i, 2i+1) instead of halves
  bool active() const { return weight != nullptr || cos != nullptr; }
};

// Rows of q, k, v lie (Hq + 2 Hkv) Dh elements apart in the fused projection (16 KB at ACE-Step's size), a
// stride the hardware prefetcher does not follow: the prologue stalled on each row's first load (half its
// time). Rows are requested PREFETCH_AHEAD ahead, one cache line at a time.
constexpr int64_t PREFETCH_AHEAD = 4;

template <typename in_t>
inline void prefetch_row(const in_t* row, int64_t Dh) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < Dh * static_cast<int64_t>(sizeof(in_t)); off += 64) __builtin_prefetch(p + off);
}

// dst (Dh, fp32) = the prologue of the row src at sequence position `pos`; `tmp` (Dh) is scratch. The
// reference's order of operations: x * rsqrt(mean(x^2) + eps) * w (w the stream weight of `pos`), then
// x * cos + rot(x) * sin. The tables
// are read through restrict-qualified locals: through `p`, every store to dst could alias them, and the loops
// reloaded the pointers instead of vectorising.
template <typename in_t>
void prologue_row(const in_t* src, int64_t Dh, const Prologue& p, int64_t pos, float* __restrict__ tmp,
                  float* __restrict__ dst) {
  const float* __restrict__ x;  // the row in fp32: fp32 read in place, bf16 / fp16 widened into tmp
  if constexpr (std::is_same_v<in_t, float>) {
    x = src;
  } else {
    cpu::widen(src, tmp, Dh);
    x = tmp;
  }
  if (p.weight) {
    const float* __restrict__ w = p.weight2 && pos >= p.split ? p.weight2 : p.weight;
    // Explicit lanes: a vectorised sum without -ffast-math, in an order that is the same on every run.
    float lanes[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= Dh; d += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += x[d + l] * x[d + l];
    for (int l = 0; d + l < Dh; ++l) lanes[l] += x[d + l] * x[d + l];
    const float rstd = 1.f / std::sqrt(cpu::sum_lanes(lanes) / static_cast<float>(Dh) + p.eps);
    float* __restrict__ y = p.cos ? tmp : dst;  // RoPE reads the normalised row whole while writing dst
    for (int64_t i = 0; i < Dh; ++i) y[i] = x[i] * rstd * w[i];
    x = y;
  }
  if (p.cos) {
    const float* __restrict__ c = p.cos + pos * p.stride_cos;
    const float* __restrict__ s = p.sin + pos * p.stride_sin;
    if (p.interleaved) {  // rot(x) = (-x[2i+1], x[2i]) per pair
      for (int64_t i = 0; i < Dh; i += 2) {
        dst[i] = x[i] * c[i] - x[i + 1] * s[i];
        dst[i + 1] = x[i + 1] * c[i + 1] + x[i] * s[i + 1];
      }
    } else {  // rot(x) = cat(-x2, x1) for the halves
      const int64_t half = Dh / 2;
      for (int64_t i = 0; i < half; ++i) {
        dst[i] = x[i] * c[i] - x[i + half] * s[i];
        dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
    }
  }
}

// k'[n0, n0 + n) of one kv head, transposed into dst (Dh, n): the scores GEMM's B operand. Rows go through
// the prologue 16 at a time into `rows` (16, Dh) and are stored transposed from there, so that the 16 columns
// a store fills are one cache line; without a prologue, softmax_rows.h's tiled transpose.
template <typename in_t>
void load_keys(const in_t* k, int64_t ld_k, int64_t n0, int64_t n, int64_t Dh, const Prologue& p, float* rows,
               float* tmp, float* dst) {
  if (!p.active()) return cpu::load_transposed(k + n0 * ld_k, n, Dh, ld_k, dst);
  constexpr int64_t CHUNK = 16;
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t m = std::min(CHUNK, n - j0);
    for (int64_t j = 0; j < m; ++j) {
      if (j0 + j + PREFETCH_AHEAD < n) prefetch_row(k + (n0 + j0 + j + PREFETCH_AHEAD) * ld_k, Dh);
      prologue_row(k + (n0 + j0 + j) * ld_k, Dh, p, n0 + j0 + j, tmp, rows + j * Dh);
    }
    for (int64_t d = 0; d < Dh; ++d)
      for (int64_t j = 0; j < m; ++j) dst[d * n + j0 + j] = rows[j * Dh + d];
  }
}

// x' = the prologue of every row of x (B, L, H, Dh), rounded to x's dtype: (B, L, H, Dh) contiguous, the
// operand of the ATen branch below (whose dots then read the rounded rows, as diffusers' do in bf16).
template <typename scalar_t>
at::Tensor apply_prologue(const at::Tensor& x, const Prologue& p) {
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), Dh = x.size(3);
  at::Tensor out = at::empty({B, L, H, Dh}, x.options());
  const scalar_t* src = x.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(Dh), row(Dh);
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L, pos = bl % L;
      for (int64_t h = 0; h < H; ++h) {
        prologue_row(src + b * x.stride(0) + pos * x.stride(1) + h * x.stride(2), Dh, p, pos, tmp.data(), row.data());
        cpu::narrow(row.data(), dst + (bl * H + h) * Dh, Dh);
      }
    }
  });
  return out;
}

struct Problem {
  int64_t B, T, S, HQ, HKV, Dh;
  Prologue pq, pk;
  int64_t window;  // the band |i - j| <= window; -1: every key (also passed when the window hides none)
  float scale;     // > 0
};

// lse: null, or (B, T, Hq) fp32 contiguous, each query row's natural-log log-sum-exp of its scaled scores.
template <typename scalar_t>
void gqa_tiles(const scalar_t* q, Strides sq, const scalar_t* k, Strides sk, const scalar_t* v, Strides sv,
               scalar_t* o, Strides so, float* lse, const Problem& pr) {
  constexpr bool fp32 = std::is_same_v<scalar_t, float>;
  const cpu::RowOps ops = cpu::row_ops();
  const int64_t Dh = pr.Dh, T = pr.T, S = pr.S, W = pr.window, G = pr.HQ / pr.HKV;
  const bool windowed = W >= 0;
  const int64_t q_tiles = (T + BLOCK_M - 1) / BLOCK_M;
  // Query tiles per task: as many as keep two tasks per thread, so that a kv head's keys go through the
  // prologue once for several tiles (all of them when there are kv heads enough for every thread).
  const int64_t group = std::clamp<int64_t>(pr.B * pr.HKV * q_tiles / (2 * at::get_num_threads()), 1, q_tiles);
  const int64_t groups = (q_tiles + group - 1) / group;
  const int64_t tile_span = windowed ? std::min(S, BLOCK_M + 2 * W) : S;  // the most keys one tile sees
  const int64_t task_span = windowed ? std::min(S, group * BLOCK_M + 2 * W) : S;  // and one task
  const int64_t block_n = std::min(BLOCK_N, tile_span);
  const bool q_plain = !pr.pq.active();
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();

  // Tasks ordered (batch, kv head, tile group): a kv head's groups follow each other on a thread.
  at::parallel_for(0, pr.B * pr.HKV * groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch (64-byte aligned by ATen's allocator), reused by every task of the range.
    at::Tensor q_buf = at::empty({G * BLOCK_M * Dh}, at::kFloat);  // the group's q tiles, prologue applied
    at::Tensor acc_buf = at::empty({G * BLOCK_M * Dh}, at::kFloat);  // unnormalised p v per q head
    at::Tensor s_buf = at::empty({BLOCK_M * block_n}, at::kFloat);  // scores, then probabilities
    // The task's k' transposed (Dh, task_span); v widened (task_span, Dh, bf16 / fp16 only); 17 rows of scratch
    at::Tensor wide_buf = at::empty({(fp32 ? 1 : 2) * task_span * Dh + 17 * Dh}, at::kFloat);
    float* q_all = q_buf.data_ptr<float>();
    float* acc_all = acc_buf.data_ptr<float>();
    float* s = s_buf.data_ptr<float>();
    float* k_all = wide_buf.data_ptr<float>();
    float* rows_buf = k_all + task_span * Dh;
    float* tmp = rows_buf + 16 * Dh;
    float* v_wide = tmp + Dh;
    std::vector<float> m_all(G * BLOCK_M), l_all(G * BLOCK_M);  // running max and sum per query row
    std::vector<const float*> q_tile(G);
    std::vector<int64_t> ldq(G);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t gi = task % groups, g = task / groups % pr.HKV, b = task / (groups * pr.HKV);
      const int64_t t0 = gi * group, t1 = std::min(q_tiles, t0 + group);  // tiles [t0, t1)
      const int64_t R0 = t0 * BLOCK_M, R1 = std::min(T, t1 * BLOCK_M);  // their query rows
      const int64_t N_lo = windowed ? std::max<int64_t>(0, R0 - W) : 0;
      const int64_t N_hi = windowed ? std::min(S, R1 + W) : S;  // the keys they see, [N_lo, N_hi)
      const int64_t span = N_hi - N_lo;
      const scalar_t* k_head = k + b * sk.b + g * sk.h;  // (S, Dh), row stride sk.t
      const scalar_t* v_head = v + b * sv.b + g * sv.h;
      load_keys(k_head, sk.t, N_lo, span, Dh, pr.pk, rows_buf, tmp, k_all);  // (Dh, span)
      int64_t ldv;
      const float* v_all = cpu::as_fp32(v_head + N_lo * sv.t, span, Dh, sv.t, v_wide, ldv);  // (span, Dh)

      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t r0 = tile * BLOCK_M, rows = std::min(BLOCK_M, T - r0);  // query rows [r0, r0 + rows)
        const int64_t n_lo = windowed ? std::max<int64_t>(0, r0 - W) : 0;
        const int64_t n_hi = windowed ? std::min(S, r0 + rows + W) : S;  // keys [n_lo, n_hi)
        const bool one_block = n_hi - n_lo <= block_n;

        for (int64_t hh = 0; hh < G; ++hh) {  // the q tile of each head of the group
          const scalar_t* src = q + b * sq.b + (g * G + hh) * sq.h + r0 * sq.t;
          float* buf = q_all + hh * BLOCK_M * Dh;
          if (q_plain) {
            q_tile[hh] = cpu::as_fp32(src, rows, Dh, sq.t, buf, ldq[hh]);  // fp32: in place
          } else {
            for (int64_t i = 0; i < rows; ++i) {
              if (i + PREFETCH_AHEAD < rows) prefetch_row(src + (i + PREFETCH_AHEAD) * sq.t, Dh);
              prologue_row(src + i * sq.t, Dh, pr.pq, r0 + i, tmp, buf + i * Dh);
            }
            q_tile[hh] = buf;
            ldq[hh] = Dh;
          }
        }

        for (int64_t n0 = n_lo; n0 < n_hi; n0 += block_n) {
          const int64_t cols = std::min(block_n, n_hi - n0);
          const bool first = n0 == n_lo;
          const float* k_t = k_all + (n0 - N_lo);  // (Dh, cols), row stride span
          const float* v_blk = v_all + (n0 - N_lo) * ldv;  // (cols, Dh), row stride ldv
          for (int64_t hh = 0; hh < G; ++hh) {
            float* acc = acc_all + hh * BLOCK_M * Dh;  // (rows, Dh)
            float* row_m = m_all.data() + hh * BLOCK_M;
            float* row_l = l_all.data() + hh * BLOCK_M;
            cpu::gemm(false, rows, cols, Dh, 1.f, q_tile[hh], ldq[hh], k_t, span, 0.f, s, block_n);  // raw q.k
            for (int64_t i = 0; i < rows; ++i) {
              float* s_row = s + i * block_n;
              int64_t a = 0, e = cols;  // this row's keys in the block: [n0 + a, n0 + e)
              if (windowed) {
                const int64_t qi = r0 + i;
                a = std::clamp<int64_t>(qi - W - n0, 0, cols);
                e = std::clamp<int64_t>(qi + W + 1 - n0, 0, cols);
              }
              if (a >= e) {  // the band misses this row in this block: no weight, nothing to rescale
                std::fill(s_row, s_row + cols, 0.f);
                if (first) row_m[i] = neg_inf, row_l[i] = 0.f;
                continue;
              }
              const float m_blk = ops.row_max(s_row + a, e - a) * pr.scale;  // scale > 0
              const float m_new = first ? m_blk : std::max(row_m[i], m_blk);
              const float sum = ops.exp_sum(s_row + a, e - a, m_new, pr.scale);
              std::fill(s_row, s_row + a, 0.f);  // the keys outside the band (their scores, NaN included, dropped)
              std::fill(s_row + e, s_row + cols, 0.f);
              if (one_block) {  // a NaN row (its sum NaN) stays NaN, and only this row
                const float inv_l = 1.f / sum;
                for (int64_t j = a; j < e; ++j) s_row[j] *= inv_l;
                row_l[i] = sum;  // for the lse only: the probabilities are final
              } else if (first) {
                row_l[i] = sum;
              } else {  // rescale what earlier key blocks accumulated to the new running max
                const float alpha = std::exp(row_m[i] - m_new);  // 0 when no earlier block held a key of the row
                row_l[i] = row_l[i] * alpha + sum;
                float* acc_row = acc + i * Dh;
                for (int64_t d = 0; d < Dh; ++d) acc_row[d] *= alpha;
              }
              row_m[i] = m_new;
            }
            // beta = 0 on the first block: the destination is not read, so stale values (or NaN) never leak in.
            if constexpr (fp32) {
              if (one_block) {
                scalar_t* o_rows = o + b * so.b + (g * G + hh) * so.h + r0 * so.t;
                cpu::gemm(false, rows, Dh, cols, 1.f, s, block_n, v_blk, ldv, 0.f, o_rows, so.t);
                continue;
              }
            }
            cpu::gemm(false, rows, Dh, cols, 1.f, s, block_n, v_blk, ldv, first ? 0.f : 1.f, acc, Dh);
          }
        }

        if (lse) {  // every row saw a key (S >= 1; in a band, its own): row_m is finite, row_l >= 1
          for (int64_t hh = 0; hh < G; ++hh) {
            float* lse_rows = lse + (b * T + r0) * pr.HQ + g * G + hh;  // (rows,), stride Hq
            for (int64_t i = 0; i < rows; ++i)
              lse_rows[i * pr.HQ] = m_all[hh * BLOCK_M + i] + std::log(l_all[hh * BLOCK_M + i]);
          }
        }
        if (one_block && fp32) continue;  // written by the GEMMs
        for (int64_t hh = 0; hh < G; ++hh) {
          scalar_t* o_rows = o + b * so.b + (g * G + hh) * so.h + r0 * so.t;
          for (int64_t i = 0; i < rows; ++i) {
            float* acc_row = acc_all + (hh * BLOCK_M + i) * Dh;
            if (!one_block) {
              const float inv_l = 1.f / l_all[hh * BLOCK_M + i];
              for (int64_t d = 0; d < Dh; ++d) acc_row[d] *= inv_l;
            }
            cpu::narrow(acc_row, o_rows + i * so.t, Dh);
          }
        }
      }
    }
  });
}

// An fp32 contiguous copy of an RMSNorm weight (Dh,) or per-stream weights (2, Dh), checked; undefined when absent.
at::Tensor norm_weight(const char* op, const char* name, const std::optional<at::Tensor>& w, int64_t Dh) {
  if (!w.has_value()) return {};
  TORCH_CHECK_VALUE((w->dim() == 1 && w->size(0) == Dh) || (w->dim() == 2 && w->size(0) == 2 && w->size(1) == Dh),
                    op, ": ", name, " must be the (Dh,) = (", Dh, ",) RMSNorm weight, got shape ", w->sizes(),
                    " (per-stream weights: (2, Dh) = (2, ", Dh, "))");
  check_cpu(op, name, *w);
  TORCH_CHECK_TYPE(at::isFloatingType(w->scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                   w->scalar_type());
  return w->to(at::kFloat).contiguous();
}

void check_rope_table(const char* op, const char* name, const at::Tensor& t, int64_t T, int64_t Dh) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == T && t.size(1) == Dh, op, ": rope ", name,
                    " must be (T, Dh) = (", T, ", ", Dh, "), got shape ", t.sizes());
  check_cpu(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": rope ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(Dh <= 1 || t.stride(1) == 1, op, ": rope ", name,
                    ": the last dimension must be contiguous, got strides ", t.strides());
}

// Both ops: `op` names the one called in messages; `with_lse` also returns each query row's log-sum-exp (B, T, Hq)
// fp32 and takes k and v without keys (S = 0: out 0, lse -inf); without it the lse is undefined.
std::tuple<at::Tensor, at::Tensor> gqa_attention_impl(
    const char* op, bool with_lse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double eps,
    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, bool rope_interleaved,
    std::optional<int64_t> window, double scale, std::optional<int64_t> norm_split) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be (B, T, Hq, Dh), got ", q.dim(), " dimensions with shape ",
                    q.sizes());
  const int64_t B = q.size(0), T = q.size(1), HQ = q.size(2), Dh = q.size(3);
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == B && k.size(3) == Dh, op,
                    ": k must be (B, S, Hkv, Dh) with q's batch and head dim (", B, ", *, *, ", Dh, "), got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t S = k.size(1), HKV = k.size(2);
  TORCH_CHECK_VALUE(HKV > 0 && HQ % HKV == 0, op, ": q's ", HQ, " heads must be a multiple of k's ", HKV, " heads");
  check_cpu(op, "q", q);
  check_cpu(op, "k", k);
  check_cpu(op, "v", v);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": q must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(k.scalar_type() == dtype, op, ": k has dtype ", k.scalar_type(), " but q has ", dtype);
  TORCH_CHECK_TYPE(v.scalar_type() == dtype, op, ": v has dtype ", v.scalar_type(), " but q has ", dtype);
  auto check_last_dim = [Dh, op](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(Dh <= 1 || t.stride(3) == 1, op, ": ", name,
                      ": the last dimension (Dh) must be contiguous, got strides ", t.strides());
  };
  check_last_dim("q", q);
  check_last_dim("k", k);
  check_last_dim("v", v);
  // The head-dim and length rules of gqa_attention's Python checks (attention.check_head_dim): the kernel itself
  // takes any head dim and returns an empty output for T = 0, but the op refuses what the public function does.
  TORCH_CHECK_VALUE(Dh >= 16 && Dh <= 256 && Dh % 8 == 0, op, ": q: head dim ", Dh,
                    " is not supported: expected a multiple of 8 from 16 to 256");
  TORCH_CHECK_VALUE(T > 0 && (S > 0 || with_lse), op, ": sequence lengths must be at least 1, got q ", T, ", k ", S,
                    with_lse ? ": q needs at least one token" : ": q, k and v need at least one token");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be a finite softmax scale > 0, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  // One of the two missing: a None where a tensor belongs, a TypeError as Python's check of the (cos, sin) pair.
  TORCH_CHECK_TYPE(cos.has_value() == sin.has_value(), op, ": rope ", cos.has_value() ? "sin" : "cos",
                   ": expected a tensor, got None (rope needs both cos and sin, or neither)");
  if (cos.has_value()) {
    TORCH_CHECK_VALUE(S == T, op, ": rope: RoPE needs k's length S = q's length T, got S=", S, ", T=", T);
    TORCH_CHECK_VALUE(Dh % 2 == 0, op, ": rope: the head dim must be even, got ", Dh);
    check_rope_table(op, "cos", *cos, T, Dh);
    check_rope_table(op, "sin", *sin, T, Dh);
  }
  if (window.has_value()) {
    TORCH_CHECK_VALUE(*window >= 0, op, ": window must be >= 0, got ", *window);
    TORCH_CHECK_VALUE(S == T, op, ": window: a sliding window needs S = T, got S=", S, ", T=", T);
  }
  const at::Tensor wq = norm_weight(op, "q_norm", q_norm, Dh), wk = norm_weight(op, "k_norm", k_norm, Dh);
  const bool split_q = wq.defined() && wq.dim() == 2, split_k = wk.defined() && wk.dim() == 2;
  if (norm_split.has_value()) {
    TORCH_CHECK_VALUE(split_q || split_k, op, ": norm_split is only for (2, Dh) per-stream q_norm / k_norm weights");
    TORCH_CHECK_VALUE(*norm_split > 0 && *norm_split < T, op, ": norm_split must satisfy 0 < norm_split < T = ", T,
                      ", got ", *norm_split);
    TORCH_CHECK_VALUE(!split_k || S == T, op, ": k_norm: (2, Dh) weights split k's rows as q's and need S = T, got S=",
                      S, ", T=", T);
  } else {
    TORCH_CHECK_VALUE(!split_q && !split_k, op, ": (2, Dh) per-stream norm weights need norm_split");
  }

  const at::Tensor lse = with_lse ? at::empty({B, T, HQ}, q.options().dtype(at::kFloat)) : at::Tensor();
  if (S == 0) {  // a key shard of padding only (with_lse; checked above): no weight anywhere, and no 0 / 0
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {at::zeros({B, T, HQ, Dh}, q.options()), lse};
  }
  if (B * HQ == 0) return {at::empty({B, T, HQ, Dh}, q.options()), lse};  // T, S and Dh are positive (checked above)
  // Rows overlapping in memory (a token stride below Dh, e.g. an expanded q) are materialised: BLAS needs a
  // leading dimension of at least Dh.
  auto rows_apart = [Dh](const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) >= Dh ? t : t.contiguous(); };
  const at::Tensor qr = rows_apart(q), kr = rows_apart(k), vr = rows_apart(v);

  Problem pr{B, T, S, HQ, HKV, Dh, {}, {}, -1, static_cast<float>(scale)};
  if (window.has_value() && *window < T - 1) pr.window = *window;  // a wider band hides no key
  auto set_prologue = [&](Prologue& p, const at::Tensor& w) {
    if (w.defined()) p.weight = w.data_ptr<float>(), p.eps = static_cast<float>(eps);
    if (w.defined() && w.dim() == 2) p.weight2 = p.weight + Dh, p.split = *norm_split;  // contiguous (2, Dh)
    if (cos.has_value()) {
      p.cos = cos->data_ptr<float>(), p.sin = sin->data_ptr<float>();
      p.stride_cos = cos->stride(0), p.stride_sin = sin->stride(0);
      p.interleaved = rope_interleaved;
    }
  };
  set_prologue(pr.pq, wq);
  set_prologue(pr.pk, wk);
  if (dtype == at::kBFloat16 && pr.window < 0 && cpu::bf16_tiles_in_hardware()) {
    // bf16 on AMX without a window: the prologue once per row, then ATen's flash attention, its GQA included
    // (0.5x the fp32-dot tiles' time at SD3-medium's joint attention, B 2, 589 tokens, 24 heads of 64; 0.5x
    // at 16 q heads over 8 kv heads). A window stays on the tiles, which walk only its band.
    auto prepared = [](const at::Tensor& x, const Prologue& p) {
      return p.active() ? apply_prologue<at::BFloat16>(x, p) : x;
    };
    const at::Tensor qp = prepared(qr, pr.pq).transpose(1, 2), kp = prepared(kr, pr.pk).transpose(1, 2);
    if (with_lse) {  // flash itself (SDPA would drop its lse), which maps kv heads as enable_gqa does
      auto [o, o_lse] = at::_scaled_dot_product_flash_attention_for_cpu(qp, kp, vr.transpose(1, 2), 0.0, false, {},
                                                                        scale);
      lse.copy_(o_lse.transpose(1, 2));  // (B, Hq, T) natural log, fp32
      return {o.transpose(1, 2).contiguous(), lse};
    }
    at::Tensor o = at::scaled_dot_product_attention(qp, kp, vr.transpose(1, 2), {}, 0.0, false, scale,
                                                    /*enable_gqa=*/HQ != HKV);
    return {o.transpose(1, 2).contiguous(), lse};  // (B, T, Hq, Dh): flash lays its output out token-major already
  }
  at::Tensor out = at::empty({B, T, HQ, Dh}, q.options());
  // (B, T, H, Dh) operands as the kernel's (batch, head, token) strides.
  auto strides_of = [](const at::Tensor& t) { return Strides{t.stride(0), t.stride(2), t.stride(1)}; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_gqa_attention_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      gqa_tiles<scalar_t>(qr.data_ptr<scalar_t>(), strides_of(qr), kr.data_ptr<scalar_t>(), strides_of(kr),
                          vr.data_ptr<scalar_t>(), strides_of(vr), out.data_ptr<scalar_t>(), strides_of(out),
                          with_lse ? lse.data_ptr<float>() : nullptr, pr);
    }
  });
  return {out, lse};
}

at::Tensor gqa_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                             double eps, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                             bool rope_interleaved, std::optional<int64_t> window, double scale,
                             std::optional<int64_t> norm_split) {
  return std::get<0>(gqa_attention_impl("ditengine::gqa_attention", false, q, k, v, q_norm, k_norm, eps, cos, sin,
                                        rope_interleaved, window, scale, norm_split));
}

std::tuple<at::Tensor, at::Tensor> gqa_attention_lse_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& q_norm,
    const std::optional<at::Tensor>& k_norm, double eps, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, bool rope_interleaved, std::optional<int64_t> window, double scale,
    std::optional<int64_t> norm_split) {
  return gqa_attention_impl("ditengine::gqa_attention_lse", true, q, k, v, q_norm, k_norm, eps, cos, sin,
                            rope_interleaved, window, scale, norm_split);
}

}  // namespace

DITENGINE_CPU_OP("gqa_attention", gqa_attention_cpu)
DITENGINE_CPU_OP("gqa_attention_lse", gqa_attention_lse_cpu)

}  // namespace ditengine
