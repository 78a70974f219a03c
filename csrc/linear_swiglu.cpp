// CPU kernels of `ditengine::linear_swiglu` and `ditengine::swiglu` (defined in kernels/linear_swiglu.py,
// whose Python bodies are the fallbacks): the SwiGLU MLP's gate and up GEMMs as one GEMM with the epilogue
// fused, and the epilogue alone,
//
//     linear_swiglu:  out = silu(x @ Wg^T + bg) * (x @ Wu^T + bu)        silu(g) = g / (1 + exp(-g))
//     swiglu:         out = silu(gu[..., :F]) * gu[..., F:]               (the stacked GEMM's output)
//
// linear_swiglu's weight is prepacked as panels (`prepack_swiglu`): (n_panels, K, 2 BN) fp32, panel j
// holding the gate rows j BN .. j BN + BN - 1 transposed in its first BN columns and the matching up rows in
// its last BN (zeros past F). One panel is the B operand (K x 2 BN, row-major) of oneDNN's brgemm, so a
// GEMM tile holds each gate column next to its up column and the epilogue pairs them in cache: the (M, 2F)
// GEMM result is never written to memory. bias, when given, is packed the same way, (n_panels, 2 BN).
//
// x (..., K) in fp32 / bf16 / fp16, widened to fp32 once per call (fp32 weights: on AVX2 CPUs a bf16 GEMM
// is emulated and several times slower than fp32, see linear_gelu.cpp); out (..., F) in x's dtype. Math
// in fp32.
//
// Blocking: tasks of (panel, TILE_M rows), panels outermost: at::parallel_for gives each thread a
// contiguous range of tasks, so a thread sweeps all rows of x under one panel (512 KB at K = 2048, BN = 32)
// while that panel is in L2, and the weight is read from memory once per call; x (6 MB at 750 x 2048) is
// re-read from the shared L3 once per panel. One thread then runs ~100 GFLOP/s on the AVX-512 development
// CPU, its FMA peak; BN = 32 measured 5-15% faster than 64 or 128 from 64 to 750 rows, TILE_M 32 to 128
// the same within noise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_common.h"
#include "cpu.h"
#include "registration.h"  // after cpu_common.h: both define DITENGINE_X86 (cpu.h as 0 off x86-64, so test it with #if)

namespace ditengine {
namespace {

constexpr int64_t TILE_M = 64;  // rows of x per task; with BN = 32 the GEMM tile is 64 x 64 fp32 = 16 KB

// y[c] = silu(g[c] + bg[c]) * (u[c] + bu[c]) for c < n; the biases may be null, y may be g itself. A NaN in
// g or u gives NaN.
void swiglu_row_scalar(const float* g, const float* u, const float* bg, const float* bu, float* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const float gv = g[c] + (bg ? bg[c] : 0.f), uv = u[c] + (bu ? bu[c] : 0.f);
    y[c] = gv / (1.f + std::exp(-gv)) * uv;
  }
}

#if DITENGINE_X86
// silu(g) = g / (1 + exp(-g)): exp saturates at ~1e38 for g < -88, giving a (signed) zero rather than
// 0 * inf = NaN; exp256 keeps a NaN g NaN.
DITENGINE_AVX2 void swiglu_row_avx2(const float* g, const float* u, const float* bg, const float* bu, float* y,
                                    int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 gv = _mm256_loadu_ps(g + c), uv = _mm256_loadu_ps(u + c);
    if (bg) gv = _mm256_add_ps(gv, _mm256_loadu_ps(bg + c));
    if (bu) uv = _mm256_add_ps(uv, _mm256_loadu_ps(bu + c));
    const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, cpu::exp256(_mm256_sub_ps(zero, gv))));
    _mm256_storeu_ps(y + c, _mm256_mul_ps(silu, uv));
  }
  swiglu_row_scalar(g + c, u + c, bg ? bg + c : nullptr, bu ? bu + c : nullptr, y + c, n - c);
}

DITENGINE_AVX512F void swiglu_row_avx512(const float* g, const float* u, const float* bg, const float* bu, float* y,
                                         int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    __m512 gv = _mm512_loadu_ps(g + c), uv = _mm512_loadu_ps(u + c);
    if (bg) gv = _mm512_add_ps(gv, _mm512_loadu_ps(bg + c));
    if (bu) uv = _mm512_add_ps(uv, _mm512_loadu_ps(bu + c));
    const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, cpu::exp512(_mm512_sub_ps(zero, gv))));
    _mm512_storeu_ps(y + c, _mm512_mul_ps(silu, uv));
  }
  swiglu_row_avx2(g + c, u + c, bg ? bg + c : nullptr, bu ? bu + c : nullptr, y + c, n - c);
}
#endif

using SwigluRowFn = void (*)(const float*, const float*, const float*, const float*, float*, int64_t);

// By the ISA the kernels run (DITENGINE_ISA caps it).
SwigluRowFn swiglu_row() {
#if DITENGINE_X86
  return cpu::pick<SwigluRowFn>(swiglu_row_avx512, swiglu_row_avx2, swiglu_row_scalar);
#else
  return swiglu_row_scalar;
#endif
}

// -- linear_swiglu --------------------------------------------------------------------------------------
template <typename out_t>
void linear_swiglu_kernel(const float* x, const float* w, const float* bias, out_t* out, int64_t M, int64_t K,
                          int64_t F, int64_t BN) {
  // x (M, K), w (n_panels, K, 2 BN), bias (n_panels, 2 BN) or null, out (M, F): contiguous.
  const SwigluRowFn finish = swiglu_row();
  const int64_t n_panels = (F + BN - 1) / BN, m_tiles = (M + TILE_M - 1) / TILE_M, ldc = 2 * BN;
  at::parallel_for(0, n_panels * m_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile_buf = at::empty({TILE_M, ldc}, at::kFloat);  // per thread, 64-byte aligned
    float* tile = tile_buf.data_ptr<float>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task / m_tiles, r0 = (task % m_tiles) * TILE_M;
      const int64_t rows = std::min(TILE_M, M - r0), cols = std::min(BN, F - j * BN), c0 = j * BN;
      const float* panel = w + j * K * ldc;                                                   // (K, 2 BN)
      cpu::gemm(false, rows, ldc, K, 1.f, x + r0 * K, K, panel, ldc, 0.f, tile, ldc);          // (rows, 2 BN)
      const float* bg = bias ? bias + j * ldc : nullptr;
      const float* bu = bias ? bg + BN : nullptr;
      for (int64_t i = 0; i < rows; ++i) {
        float* t_row = tile + i * ldc;  // gate columns, then the matching up columns
        if constexpr (std::is_same_v<out_t, float>) {
          finish(t_row, t_row + BN, bg, bu, out + (r0 + i) * F + c0, cols);
        } else {
          finish(t_row, t_row + BN, bg, bu, t_row, cols);  // in place over the gate half, then rounded once
          cpu::narrow(t_row, out + (r0 + i) * F + c0, cols);
        }
      }
    }
  });
}

at::Tensor linear_swiglu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             int64_t out_features) {
  const char* op = "ditengine::linear_swiglu";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (..., K)");
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(2) > 0 && weight.size(2) % 2 == 0, op,
                    ": weight must be prepacked panels (n_panels, K, 2 BN), got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, op, ": weight must be float32 (prepacked), got ",
                   weight.scalar_type());
  const int64_t n_panels = weight.size(0), K = x.size(-1), BN = weight.size(2) / 2, F = out_features;
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": weight ", weight.sizes(), " does not take x's last dimension ", K);
  TORCH_CHECK_VALUE(F > (n_panels - 1) * BN && F <= n_panels * BN, op, ": out_features ", F, " does not fit ",
                    n_panels, " panels of ", BN, " columns");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), op, " (CPU kernel): x and weight must be CPU ",
                    "tensors, got ", x.device(), " and ", weight.device());
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == n_panels && bias->size(1) == 2 * BN, op,
                      ": bias must be prepacked (", n_panels, ", ", 2 * BN, "), got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), op, " (CPU kernel): bias must be a CPU tensor, got ", bias->device());
    b32 = bias->contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = F;
  at::Tensor out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (K == 0) {  // an empty sum: the epilogue of the biases alone
    at::Tensor gu = b32.defined() ? b32.view({n_panels, 2, BN}) : at::zeros({n_panels, 2, BN}, at::kFloat);
    at::Tensor y = (at::silu(gu.select(1, 0)) * gu.select(1, 1)).reshape({-1}).slice(0, 0, F);  // (F,)
    return out.copy_(y.expand(out_shape));
  }
  const int64_t M = x.numel() / K;
  // Widened once (no copy for contiguous fp32); a few % of the GEMM's work at MLP shapes.
  const at::Tensor x32 = x.reshape({M, K}).to(at::kFloat).contiguous();  // (M, K)
  const at::Tensor w32 = weight.contiguous();                             // (n_panels, K, 2 BN)
  const float* b_ptr = b32.defined() ? b32.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_linear_swiglu_cpu", [&] {
    linear_swiglu_kernel<scalar_t>(x32.data_ptr<float>(), w32.data_ptr<float>(), b_ptr, out.data_ptr<scalar_t>(), M,
                                   K, F, BN);
  });
  return out;
}

// -- swiglu ---------------------------------------------------------------------------------------------
template <typename T>
void swiglu_kernel(const T* gu, int64_t row_stride, T* out, int64_t M, int64_t F) {
  // gu (M, 2F) rows `row_stride` apart, out (M, F) contiguous.
  const SwigluRowFn finish = swiglu_row();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / F), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : 2 * F);  // one widened row: gate half, up half
    for (int64_t m = begin; m < end; ++m) {
      const T* row = gu + m * row_stride;
      if constexpr (std::is_same_v<T, float>) {
        finish(row, row + F, nullptr, nullptr, out + m * F, F);
      } else {
        cpu::widen(row, buf.data(), 2 * F);
        finish(buf.data(), buf.data() + F, nullptr, nullptr, buf.data(), F);
        cpu::narrow(buf.data(), out + m * F, F);
      }
    }
  });
}

at::Tensor swiglu_cpu(const at::Tensor& gu) {
  // `_check_gu` of kernels/linear_swiglu.py, in its order and words (check_tensor's): the public function, the
  // op's Python body and this kernel raise the same error for a bad gu.
  const char* op = "ditengine::swiglu";
  check_dtype_in(op, "gu", gu, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(gu.device().is_cpu(), op, ": gu: expected a CPU tensor, got one on ", gu.device());
  TORCH_CHECK_VALUE(gu.dim() == 0 || gu.size(-1) <= 1 || gu.stride(-1) == 1, op,
                    ": gu: the last dimension must be contiguous (stride 1), got strides ", tuple_str(gu.strides()));
  TORCH_CHECK_VALUE(gu.dim() >= 1 && gu.size(-1) % 2 == 0, op,
                    ": gu: expected (..., 2F) with an even last dimension (gate then up), got ",
                    tuple_str(gu.sizes()));
  const auto dtype = gu.scalar_type();
  const int64_t F = gu.size(-1) / 2;
  std::vector<int64_t> out_shape(gu.sizes().begin(), gu.sizes().end());
  out_shape.back() = F;
  at::Tensor out = at::empty(out_shape, gu.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t M = out.numel() / F;
  at::Tensor rows = gu.reshape({M, 2 * F});  // a view wherever the leading dims collapse
  if (rows.stride(1) != 1) rows = rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_swiglu_cpu", [&] {
    swiglu_kernel<scalar_t>(rows.data_ptr<scalar_t>(), rows.stride(0), out.data_ptr<scalar_t>(), M, F);
  });
  return out;
}

}  // namespace

DITENGINE_CPU_OP("linear_swiglu", linear_swiglu_cpu)
DITENGINE_CPU_OP("swiglu", swiglu_cpu)

}  // namespace ditengine
