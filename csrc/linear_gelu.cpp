// CPU kernel of `ditengine::linear_gelu` (defined in kernels/linear_gelu.py, whose Python body is the
// fallback): DiT's fc1 and its tanh GELU in one pass,
//
//     out = gelu_tanh(x @ weight^T + bias)        (apply_gelu = false: the plain linear)
//
// with the GELU on the output columns [gelu_from, N) only (default 0: all of them), the bias on all: Flux's
// single-stream block runs its stacked q / k / v / proj_mlp weight as one GEMM with gelu_from = 3D.
//     gelu_tanh(y) = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) = y * sigmoid(2 sqrt(2/pi) (y + 0.044715 y^3))
//
// x (..., K) in fp32 / bf16 / fp16; weight (N, K) and bias (N) in fp32 (the prepacked form) or in x's
// dtype; the output (..., N) is in x's dtype. Math in fp32.
//
// Why fp32 weights for bf16 activations: on CPUs without bf16 dot instructions (AVX2) a bf16 GEMM is
// emulated and measures ~7x slower than the fp32 GEMM at DiT's fc1 shapes, so the sampler keeps an fp32
// copy of the weights (converted once) and x is widened here, tile by tile's worth of rows, once per call.
//
// Blocking: tasks of (TILE_M rows x TILE_N columns) over at::parallel_for; each runs one fp32 GEMM into an
// L2-resident scratch tile and applies bias + GELU + the output rounding while the tile is still in cache,
// instead of writing the GEMM result to memory and reading it back for a separate GELU. A column tile that
// straddles gelu_from splits its columns there (the tiles are not aligned to it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "cpu_common.h"
#include "registration.h"
#include "gelu_epilogue.h"

namespace ditengine {
namespace {

constexpr int64_t TILE_M = 128;  // rows of x per task
constexpr int64_t TILE_N = 256;  // output columns per task: a 128 KB fp32 tile

template <typename out_t>
void linear_gelu_kernel(const float* x, const float* w, const float* bias, out_t* out, int64_t M, int64_t K,
                        int64_t N, int64_t gelu_from) {
  // x (M, K), w (N, K), bias (N) or null, out (M, N): contiguous. GELU on columns >= gelu_from (N: none).
  const EpilogueFn finish = epilogue();
  const int64_t m_tiles = (M + TILE_M - 1) / TILE_M, n_tiles = (N + TILE_N - 1) / TILE_N;
  at::parallel_for(0, m_tiles * n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile_buf = at::empty({TILE_M, TILE_N}, at::kFloat);  // per thread, 64-byte aligned
    float* tile = tile_buf.data_ptr<float>();
    for (int64_t task = begin; task < end; ++task) {
      // Column tiles of one row tile are neighbours: consecutive tasks share the rows of x in cache.
      const int64_t r0 = (task / n_tiles) * TILE_M, c0 = (task % n_tiles) * TILE_N;
      const int64_t rows = std::min(TILE_M, M - r0), cols = std::min(TILE_N, N - c0);
      cpu::gemm(true, rows, cols, K, 1.f, x + r0 * K, K, w + c0 * K, K, 0.f, tile, TILE_N);  // (rows, cols)
      for (int64_t i = 0; i < rows; ++i) {
        float* t_row = tile + i * TILE_N;
        bias_gelu_cols(finish, t_row, bias ? bias + c0 : nullptr, cols, gelu_from - c0);
        cpu::narrow(t_row, out + (r0 + i) * N + c0, cols);  // bf16: round to nearest even
      }
    }
  });
}

at::Tensor linear_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool apply_gelu, int64_t gelu_from) {
  // The checks of `check_linear_gelu` in kernels/linear_gelu.py, in its order and words: ValueError for a shape or
  // value, TypeError for a dtype.
  const char* op = "ditengine::linear_gelu";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (..., K)");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be (N, K), got shape ", weight.sizes());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": weight ", weight.sizes(), " does not take x's last dimension ", K);
  TORCH_CHECK_VALUE(gelu_from >= 0 && gelu_from <= N, op, ": gelu_from: expected 0 <= gelu_from <= out_features = ",
                    N, ", got ", gelu_from);
  // Without the GELU, or with it from column N on: the plain linear.
  const int64_t first_gelu = apply_gelu ? gelu_from : N;
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == dtype, op,
                   ": weight must be float32 or x's dtype ", dtype, ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), op, " (CPU kernel): x and weight ",
                    "must be CPU tensors, got ", x.device(), " and ", weight.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be (", N, "), got shape ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                     " must match weight dtype ", weight.scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), op, " (CPU kernel): bias must be a CPU tensor, got one on ",
                      bias->device());
  }
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    // float64 and the rest: the op's Python form, in the weight's dtype.
    at::Tensor y = at::linear(x.to(weight.scalar_type()), weight, bias);  // (..., N)
    if (first_gelu == 0) return at::gelu(y, "tanh").to(dtype);
    if (first_gelu < N) {
      at::Tensor tail = y.narrow(-1, first_gelu, N - first_gelu);  // a view: in place
      at::gelu_(tail, "tanh");
    }
    return y.to(dtype);
  }
  at::Tensor b32;
  if (has_bias) b32 = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = K > 0 ? x.numel() / K : 0;
  if (out.numel() == 0) return out;
  if (K == 0) {  // an empty sum: the bias alone, through the same epilogue
    out.copy_(b32.defined() ? b32.expand(out_shape) : at::zeros(out_shape, at::kFloat));
    if (first_gelu < N) {
      at::Tensor tail = out.narrow(-1, first_gelu, N - first_gelu);  // a view: in place
      at::gelu_(tail, "tanh");
    }
    return out;
  }
  // Widened once (no copy for contiguous fp32); a few % of the GEMM's work at DiT shapes.
  const at::Tensor x32 = x.reshape({M, K}).to(at::kFloat).contiguous();  // (M, K)
  const at::Tensor w32 = weight.to(at::kFloat).contiguous();              // (N, K)
  const float* b_ptr = b32.defined() ? b32.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ditengine_linear_gelu_cpu", [&] {
    linear_gelu_kernel<scalar_t>(x32.data_ptr<float>(), w32.data_ptr<float>(), b_ptr, out.data_ptr<scalar_t>(), M, K,
                                 N, first_gelu);
  });
  return out;
}

}  // namespace

DITENGINE_CPU_OP("linear_gelu", linear_gelu_cpu)

}  // namespace ditengine
