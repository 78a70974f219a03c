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
// The tiles and the online softmax are csrc/softmax_rows.h's `attention_tiles`, which self-attention
// shares: each batch row's tiles walk only its first len_b keys. bf16 / fp16 blocks are widened to fp32 as
// they are loaded and the output rounded once, at the end (see csrc/attention.cpp for why fp32 dots are the
// fast choice here). bf16 on a CPU with AMX tiles runs ATen's flash attention instead, on each row's valid keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "checks.h"
#include "registration.h"
#include "softmax_rows.h"

namespace ditengine {
namespace {

constexpr const char* OP = "ditengine::cross_attention";

// The checks of kernels/cross_attention.py's `check_inputs` (the public function's and the op's Python body's) in
// C++: the same exception type for the same mistake (csrc/checks.h), each message naming the op and the argument.
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
  check_cpu(OP, "q", q);
  check_cpu(OP, "kv", kv);
  check_cpu(OP, "kv_lens", kv_lens);
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
  TORCH_CHECK_VALUE(Dh > 0, OP, ": q: the head dim must be positive, got shape ", q.sizes());

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
  if (dtype == at::kBFloat16 && cpu::bf16_tiles_in_hardware()) {
    // bf16 on AMX: ATen's flash attention on each row's valid keys (the padding still never read), one call for
    // the batch when no row is padded: 0.3x the fp32-dot tiles' time at Wan's 2,240 queries x 512 keys, 12 heads
    // of 128. Flash attention gives a NaN key's scores zero weight; a valid key holding a NaN reaches every query
    // of its (row, head) in the reference and the tiles, so those heads are set to NaN after (one pass over the
    // short key side).
    auto attend = [&](int64_t b, int64_t n, int64_t keys) {
      const at::Tensor kvb = kv.narrow(0, b, n).narrow(1, 0, keys);
      at::Tensor o = at::scaled_dot_product_attention(q.narrow(0, b, n).transpose(1, 2),
                                                      kvb.select(2, 0).transpose(1, 2),
                                                      kvb.select(2, 1).transpose(1, 2), {}, 0.0, false,
                                                      softmax_scale).transpose(1, 2);  // (n, T, H, Dh)
      const at::Tensor nan_heads = at::isnan(kvb.select(2, 0)).any(3).any(1);  // (n, H)
      if (nan_heads.any().item<bool>()) o = o.masked_fill(nan_heads.view({n, 1, H, 1}), NAN);
      out.narrow(0, b, n).copy_(o);
    };
    if (min_len == L) {
      attend(0, B, L);
    } else {
      for (int64_t b = 0; b < B; ++b) attend(b, 1, lens[b]);
    }
    return out;
  }
  // Rows overlapping in memory (a token stride below Dh, e.g. an expanded q or kv) are materialised: BLAS
  // needs a leading dimension of at least Dh.
  const at::Tensor qr = T_q <= 1 || q.stride(1) >= Dh ? q : q.contiguous();
  const at::Tensor kvr = L <= 1 || kv.stride(1) >= Dh ? kv : kv.contiguous();
  // (B, T, H, Dh) operands as the kernel's (B, H, T, Dh) strides; k and v are kv's two halves.
  const cpu::Strides sq{qr.stride(0), qr.stride(2), qr.stride(1)};
  const cpu::Strides skv{kvr.stride(0), kvr.stride(3), kvr.stride(1)};
  const cpu::Strides so{out.stride(0), out.stride(2), out.stride(1)};
  const float scale = static_cast<float>(softmax_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_cross_attention_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t* kv_ptr = kvr.data_ptr<scalar_t>();
      cpu::attention_tiles<scalar_t>(qr.data_ptr<scalar_t>(), sq, kv_ptr, skv, kv_ptr + kvr.stride(2), skv,
                                     out.data_ptr<scalar_t>(), so, B, H, T_q, L, lens.data(), Dh, scale);
    }
  });
  return out;
}

}  // namespace

DITENGINE_CPU_OP("cross_attention", cross_attention_cpu)

}  // namespace ditengine
