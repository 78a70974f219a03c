// CPU kernel of `ditengine::linear_int8` (defined in kernels/linear_int8.py, whose Python body is the
// fallback and the definition): a W8A8 linear with dynamic per-token activation scales,
//
//     s_m = max_k |x_mk| / 127,  q_mk = round_half_even(x_mk * (127 / max_k |x_mk|))     (int8, per row)
//     out_mn = act(float(sum_k q_mk w_nk) * (s_m * ws_n) + bias_n)          (int32 accumulation, exact)
//
// x (..., K) fp32 / bf16 / fp16; weight (N, K) int8 with per-output-channel scales ws (N) fp32; bias (N)
// fp32 or none; out (..., N) in x's dtype.
//
// Three passes: the row quantisation (one read of x), the int8 GEMM (oneDNN's s8s8s32 matmul behind
// at::_int_mm, VNNI where the CPU has it), and the dequantising epilogue, in place on the int32 result
// (same element size as fp32), with bias and GELU while each row is in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "gelu_epilogue.h"  // cpu_common.h, then cpu.h
#include "registration.h"


namespace ditengine {
namespace {

using cpu::Elem;

// One row of x to int8 and its scale. Rounding half to even and the multiply by 127 / amax are the Python body's ops in the
// same order, so both forms give the same q. An all-zero row gets scale 0 (its output is the bias); a
// non-finite row gets q = 0 and scale NaN, so its output is NaN rather than a plausible number.
template <class T>
DITENGINE_INLINE void quantize_row(const T* __restrict__ x, int64_t K, int8_t* __restrict__ q, float* scale) {
  // Lane-wise max |x| and a probe sum of x * 0, which is NaN exactly when some x is not finite (max drops NaN).
  float lanes[cpu::kLanes] = {}, probe[cpu::kLanes] = {};
  int64_t k = 0;
  for (; k + cpu::kLanes <= K; k += cpu::kLanes)
    for (int j = 0; j < cpu::kLanes; ++j) {
      const float v = Elem<T>::load(x, k + j);
      lanes[j] = std::max(lanes[j], std::fabs(v));
      probe[j] += v * 0.f;
    }
  float amax = 0.f, bad = 0.f;
  for (int j = 0; j < cpu::kLanes; ++j) amax = std::max(amax, lanes[j]), bad += probe[j];
  for (; k < K; ++k) {
    const float v = Elem<T>::load(x, k);
    amax = std::max(amax, std::fabs(v));
    bad += v * 0.f;
  }
  amax += bad;  // NaN for a non-finite row
  const float inv = amax > 0.f ? 127.f / amax : 0.f;  // NaN > 0 is false: q = 0, scale NaN
  for (int64_t i = 0; i < K; ++i) {
    // nearbyint in the default rounding mode is round-half-even, vectorised (vrndscaleps / vroundps);
    // roundevenf is a libm call per element in GCC 12, 7x slower here.
    const float r = std::nearbyint(Elem<T>::load(x, i) * inv);
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
  }
  *scale = amax / 127.f;
}

// acc (int32) -> acc * (s * ws) in fp32, in place on the same bytes.
DITENGINE_INLINE void dequantize_row(int32_t* acc, float s, const float* __restrict__ ws, int64_t N) {
  float* y = reinterpret_cast<float*>(acc);
  for (int64_t n = 0; n < N; ++n) y[n] = static_cast<float>(acc[n]) * (s * ws[n]);
}

template <class T>
DITENGINE_INLINE void quantize_rows(const void* x, int64_t begin, int64_t end, int64_t K, int8_t* q, float* s) {
  for (int64_t m = begin; m < end; ++m) quantize_row(static_cast<const T*>(x) + m * K, K, q + m * K, s + m);
}

struct Int8Params {
  const void* x;
  at::ScalarType dtype;
  int64_t K;
  int8_t* q;
  float* scales;
};

DITENGINE_INLINE void quantize_body(const Int8Params& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case at::kFloat: quantize_rows<float>(p.x, begin, end, p.K, p.q, p.scales); break;
    case at::kBFloat16: quantize_rows<uint16_t>(p.x, begin, end, p.K, p.q, p.scales); break;
    default: quantize_rows<c10::Half>(p.x, begin, end, p.K, p.q, p.scales);
  }
}

using QuantizeFn = void (*)(const Int8Params&, int64_t, int64_t);
DITENGINE_TARGET_AVX512 void quantize_avx512(const Int8Params& p, int64_t b, int64_t e) { quantize_body(p, b, e); }
DITENGINE_TARGET_AVX2 void quantize_avx2(const Int8Params& p, int64_t b, int64_t e) { quantize_body(p, b, e); }
void quantize_baseline(const Int8Params& p, int64_t b, int64_t e) { quantize_body(p, b, e); }

using DequantizeFn = void (*)(int32_t*, float, const float*, int64_t);
DITENGINE_TARGET_AVX512 void dequantize_avx512(int32_t* a, float s, const float* w, int64_t n) {
  dequantize_row(a, s, w, n);
}
DITENGINE_TARGET_AVX2 void dequantize_avx2(int32_t* a, float s, const float* w, int64_t n) {
  dequantize_row(a, s, w, n);
}
void dequantize_baseline(int32_t* a, float s, const float* w, int64_t n) { dequantize_row(a, s, w, n); }

at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& bias, bool apply_gelu) {
  static const QuantizeFn quantize = cpu::pick<QuantizeFn>(quantize_avx512, quantize_avx2, quantize_baseline);
  static const DequantizeFn dequantize =
      cpu::pick<DequantizeFn>(dequantize_avx512, dequantize_avx2, dequantize_baseline);
  // The checks of `check_linear_int8` in kernels/linear_int8.py, in its order and words: ValueError for a shape or
  // value, TypeError for a dtype.
  const char* op = "ditengine::linear_int8";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (..., K)");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be (N, K) int8, got ", weight.sizes(), " ",
                    weight.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, op, ": weight must be (N, K) int8, got ", weight.sizes(), " ",
                   weight.scalar_type());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": weight ", weight.sizes(), " does not take x's last dimension ", K);
  TORCH_CHECK_VALUE(weight_scale.dim() == 1 && weight_scale.size(0) == N, op, ": weight_scale must be (", N,
                    ") float32, got ", weight_scale.sizes(), " ", weight_scale.scalar_type());
  TORCH_CHECK_TYPE(weight_scale.scalar_type() == at::kFloat, op, ": weight_scale must be (", N, ") float32, got ",
                   weight_scale.sizes(), " ", weight_scale.scalar_type());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu() && weight_scale.device().is_cpu(), op,
                    " (CPU kernel): x, weight and weight_scale must be CPU tensors, got ", x.device(), ", ",
                    weight.device(), " and ", weight_scale.device());
  const float* b_ptr = nullptr;
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be a (", N,
                      ") float32 CPU tensor, got ", bias->sizes(), " ", bias->scalar_type());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be a (", N, ") float32 CPU tensor, got ",
                     bias->sizes(), " ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), op, ": bias must be a (", N, ") float32 CPU tensor, got one on ",
                      bias->device());
    b32 = bias->contiguous();
    b_ptr = b32.data_ptr<float>();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  if (M == 0 || N == 0 || K == 0) {  // empty, or an empty sum: the bias alone
    at::Tensor y = b32.defined() ? b32.expand(out_shape).clone() : at::zeros(out_shape, at::kFloat);
    return (apply_gelu ? at::gelu(y, "tanh") : y).to(dtype);
  }
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  at::Tensor q = at::empty({M, K}, at::kChar);
  at::Tensor scales = at::empty({M}, at::kFloat);
  const Int8Params p{xc.data_ptr(), dtype, K, q.data_ptr<int8_t>(), scales.data_ptr<float>()};
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) { quantize(p, b, e); });
  // (M, N) int32. The weight's (N, K) rows as the (K, N) column-major operand: the layout oneDNN's int8
  // matmul ran fastest with here (0.34 against 0.60 ms for a contiguous (K, N) copy at 512 x 384 -> 1152).
  at::Tensor acc = at::_int_mm(q, weight.t());
  const float* ws = weight_scale.contiguous().data_ptr<float>();
  const EpilogueFn finish = epilogue();
  at::Tensor out = dtype == at::kFloat ? acc.view(at::kFloat) : at::empty({M, N}, x.options());
  int32_t* acc_ptr = acc.data_ptr<int32_t>();
  const float* s_ptr = scales.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      int32_t* row = acc_ptr + m * N;
      dequantize(row, s_ptr[m], ws, N);
      float* y = reinterpret_cast<float*>(row);
      finish(y, b_ptr, N, apply_gelu);
      if (dtype == at::kBFloat16) cpu::narrow(y, out.data_ptr<at::BFloat16>() + m * N, N);
      else if (dtype == at::kHalf) cpu::narrow(y, out.data_ptr<at::Half>() + m * N, N);
    }
  });
  return out.view(out_shape);
}

}  // namespace

DITENGINE_CPU_OP("linear_int8", linear_int8_cpu)

}  // namespace ditengine
