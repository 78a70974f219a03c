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
// The tiles and the online softmax are csrc/softmax_rows.h's `attention_tiles`, which cross-attention
// shares (with a key count per batch row).
//
// Dot products run in fp32: bf16 (and fp16) blocks are widened as they are loaded. On CPUs without bf16 dot
// instructions (AVX2: no avx512_bf16, no AMX) a bf16 GEMM is emulated through fp32 and measures ~6x slower
// than the fp32 GEMM at DiT shapes, so fp32 dots are both the fastest and the most precise choice there;
// the output is rounded to the input dtype once, at the end. Where the CPU has AMX (what ATen's
// `cpublas::could_pack` reports for bf16), bf16 runs ATen's flash attention instead, whose tiles multiply
// bf16 blocks packed for AMX with fp32 accumulation: at DiT-S/2's shapes (B 2, H 6, T 256, Dh 64) it took
// 0.39 ms against this kernel's 0.84 (Xeon with AMX, 2 threads, same process); in fp32 this kernel is the
// faster (0.90 ms against 4.1). It reads the same strided views and its output is laid out (B, T, H, Dh).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "registration.h"
#include "softmax_rows.h"

namespace ditengine {
namespace {

using cpu::Strides;

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The checks of kernels/attention.py's `check_inputs` (the public function's and the op's Python body's) in C++:
// the same exception type for the same mistake (ValueError for a shape or a value, TypeError for a dtype, as
// csrc/checks.h asks), each message naming the op and the argument.
void check_input(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, "ditengine::attention: ", name, " must be (B, H, T, Dh), got ", t.dim(),
                    " dimensions with shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "ditengine::attention (CPU kernel): ", name, " must be a CPU tensor, got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "ditengine::attention: ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "ditengine::attention: ", name,
                    ": the last dimension (Dh) must be contiguous, got strides ", t.strides());
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double softmax_scale,
                         bool tokens_first, bool head_split) {
  (void)head_split;  // a Triton block choice; the CPU GEMMs take any head dim
  check_input("q", q, q);
  const auto dtype = q.scalar_type();
  // float64 runs SDPA below, as in the op's Python body; an integer q would reach SDPA's own error.
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                   "ditengine::attention: q must be float32, bfloat16, float16 or float64, got ", dtype);
  check_input("k", k, q);
  check_input("v", v, q);
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2), Dh = q.size(3), T_k = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == Dh, "ditengine::attention: k ", k.sizes(),
                    " must match q ", q.sizes(), " in batch, heads and head dim");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "ditengine::attention: v ", v.sizes(), " must have k's shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(T_k > 0, "ditengine::attention: k and v need at least one token");
  TORCH_CHECK_VALUE(Dh > 0, "ditengine::attention: q: the head dim must be positive, got shape ", q.sizes());

  // Rows overlapping in memory (a token stride below Dh, e.g. an expanded k) are materialised: BLAS needs
  // a leading dimension of at least Dh.
  auto rows_apart = [Dh](const at::Tensor& t) { return t.size(2) <= 1 || t.stride(2) >= Dh ? t : t.contiguous(); };
  const at::Tensor qr = rows_apart(q), kr = rows_apart(k), vr = rows_apart(v);
  if (dtype == at::kDouble || !(softmax_scale > 0) || (dtype == at::kBFloat16 && cpu::bf16_tiles_in_hardware())) {
    // float64: the op's Python body runs SDPA; so does this kernel. So does a scale that is not positive (the
    // row max of the scaled scores is taken as the raw max times the scale), and bf16 on AMX (above).
    at::Tensor out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, softmax_scale);
    return tokens_first ? out.transpose(1, 2).contiguous() : out.contiguous();
  }
  at::Tensor out = tokens_first ? at::empty({B, T_q, H, Dh}, q.options()) : at::empty({B, H, T_q, Dh}, q.options());
  if (out.numel() == 0) return out;
  at::Tensor o = tokens_first ? out.transpose(1, 2) : out;  // (B, H, T, Dh) view of the output
  const float scale = static_cast<float>(softmax_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_attention_cpu", [&] {
    cpu::attention_tiles<scalar_t>(qr.data_ptr<scalar_t>(), strides_of(qr), kr.data_ptr<scalar_t>(), strides_of(kr),
                                   vr.data_ptr<scalar_t>(), strides_of(vr), o.data_ptr<scalar_t>(), strides_of(o), B,
                                   H, T_q, T_k, nullptr, Dh, scale);
  });
  return out;
}

}  // namespace

DITENGINE_CPU_OP("attention", attention_cpu)

}  // namespace ditengine
