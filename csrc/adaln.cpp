// Native CPU kernels of adaLN modulation and gated residual + adaLN; see kernels/adaln.py for
// the formulas, shapes and the Python definition of the ops.
//
//     adaln_modulate:        y = norm(x) * weight * (1 + scale) + shift
//     gated_residual_adaln:  x_new = x + gate * o ;  y = norm(x_new) * weight * (1 + scale) + shift
//
// The *_dual ops (SD3.5's dual-attention layers) also write y2 with a second (shift2, scale2) from the same
// row statistics.
// norm is LayerNorm without affine, or RMSNorm (`rms`: no mean, x * rsqrt(mean(x^2) + eps)); weight (D,) is
// optional. One row of D elements at a time, rows spread over threads by at::parallel_for. Each row is read
// once from memory into an fp32 scratch row that stays in L1/L2; the statistics (in fp32: a two-pass mean
// and variance, or one pass of the sum of squares) and the modulation then run over that scratch, and each
// output is written once. Registered as the CPU kernels of the ops that kernels/adaln.py defines, so
// torch.ops.ditengine.* on CPU tensors run here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu.h"
#include "checks.h"
#include "registration.h"

namespace ditengine {
namespace {

using cpu::Elem;
using cpu::kLanes;

struct Strided {  // a (B, D) modulation vector or a (B, T, D) activation, last dim contiguous
  const void* data;
  at::ScalarType dtype;
  int64_t stride_b;
  int64_t stride_t;
};

struct AdalnParams {
  int64_t T, D;
  float eps;
  bool gated;
  Strided x, o, gate, shift, scale;
  Strided weight;  // (D,); data is null for no weight
  void* x_out;  // gated only: x_new, in x's dtype (may be x itself)
  int64_t x_out_stride_b, x_out_stride_t;
  void* y;  // contiguous (B, T, D)
  at::ScalarType y_dtype;
  Strided shift2, scale2;  // dual only
  void* y2;  // dual only: contiguous (B, T, D) in y's dtype; null otherwise
};

template <class T>
DITENGINE_INLINE void widen(const T* src, int64_t D, float* __restrict__ dst) {
  for (int64_t i = 0; i < D; ++i) dst[i] = Elem<T>::load(src, i);
}

// An fp32 view of a row: fp32 rows are read in place, bf16/fp16 rows are widened into `scratch`.
DITENGINE_INLINE const float* float_row(const void* src, at::ScalarType dtype, int64_t D, float* scratch) {
  switch (dtype) {
    case at::kFloat: return static_cast<const float*>(src);
    case at::kBFloat16: widen(static_cast<const uint16_t*>(src), D, scratch); return scratch;
    default: widen(static_cast<const c10::Half*>(src), D, scratch); return scratch;
  }
}

DITENGINE_INLINE const float* modulation_row(const Strided& m, int64_t b, int64_t D, float* scratch) {
  const char* base = static_cast<const char*>(m.data) + b * m.stride_b * c10::elementSize(m.dtype);
  return float_row(base, m.dtype, D, scratch);
}

// Sum of value(0), ..., value(D-1) in kLanes partial sums; value(i) may also store (the widened row), so
// that widening and the first statistics pass share one loop. The partial sums start from the first block
// rather than from zero: a 256-byte memset per row is measurable here.
template <class Value>
DITENGINE_INLINE float lane_sum(int64_t D, Value value) {
  const int64_t full = D - D % kLanes;
  float acc[kLanes];
  if (full) {
    for (int j = 0; j < kLanes; ++j) acc[j] = value(j);
  } else {
    for (int j = 0; j < kLanes; ++j) acc[j] = 0.f;
  }
  for (int64_t i = full ? kLanes : 0; i < full; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += value(i + j);
  for (int64_t i = full; i < D; ++i) acc[i - full] += value(i);
  return cpu::sum_lanes(acc);
}

// What a row's first statistics pass sums: the values (LayerNorm's mean) or their squares (RMSNorm).
template <bool kRms>
DITENGINE_INLINE float stat(float v) {
  return kRms ? v * v : v;
}

// 1/std of an fp32 row around its mean: the second pass of a two-pass variance, over L1-resident data.
DITENGINE_INLINE float row_rstd(const float* __restrict__ x, int64_t D, float mean, float eps) {
  const float sq = lane_sum(D, [&](int64_t i) {
    const float d = x[i] - mean;
    return d * d;
  });
  // NaN or Inf anywhere in the row makes mean or variance NaN, hence the whole row, and only this row.
  return 1.f / std::sqrt(sq / static_cast<float>(D) + eps);
}

// Widens a bf16/fp16 row into `dst` and returns the sum of its values or of their squares, in one loop.
template <bool kRms, class T>
DITENGINE_INLINE float widen_sum(const T* __restrict__ src, int64_t D, float* __restrict__ dst) {
  return lane_sum(D, [&](int64_t i) {
    const float v = Elem<T>::load(src, i);
    dst[i] = v;
    return stat<kRms>(v);
  });
}

// The multiplications in the order of the reference, ((x - mean) * rstd) * weight * (1 + scale), so that fp32
// results differ from it only by FMA contraction. Without a weight the loop has no multiply by ones.
template <class TY>
DITENGINE_INLINE void modulate(const float* __restrict__ x, float mean, float rstd, const float* __restrict__ weight,
                               const float* __restrict__ shift, const float* __restrict__ scale, int64_t D,
                               TY* __restrict__ y) {
  if (weight) {
    for (int64_t i = 0; i < D; ++i)
      Elem<TY>::store(y, i, (x[i] - mean) * rstd * weight[i] * (1.f + scale[i]) + shift[i]);
  } else {
    for (int64_t i = 0; i < D; ++i) Elem<TY>::store(y, i, (x[i] - mean) * rstd * (1.f + scale[i]) + shift[i]);
  }
}

DITENGINE_INLINE void modulate_into(at::ScalarType dtype, char* y, const float* x, float mean, float rstd,
                                    const float* weight, const float* shift, const float* scale, int64_t D) {
  switch (dtype) {
    case at::kFloat: modulate(x, mean, rstd, weight, shift, scale, D, reinterpret_cast<float*>(y)); break;
    case at::kBFloat16: modulate(x, mean, rstd, weight, shift, scale, D, reinterpret_cast<uint16_t*>(y)); break;
    default: modulate(x, mean, rstd, weight, shift, scale, D, reinterpret_cast<c10::Half*>(y));
  }
}

// x_new = x + gate * o, rounded to x's dtype and stored; its fp32 value (as stored) goes to xf, so that y
// normalises exactly the residual that the next block reads.
template <class TX, class TO>
DITENGINE_INLINE void residual(const TX* x, const float* __restrict__ gate, const TO* __restrict__ o, int64_t D,
                               TX* x_out, float* __restrict__ xf) {
  // x_out may be x (the in-place op): element i is read before it is written, no other element is touched.
#pragma GCC ivdep
  for (int64_t i = 0; i < D; ++i) {
    const float v = Elem<TX>::load(x, i) + gate[i] * Elem<TO>::load(o, i);
    Elem<TX>::store(x_out, i, v);
    xf[i] = Elem<TX>::round(v);
  }
}

template <bool kRms>
DITENGINE_INLINE void adaln_rows(const AdalnParams& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t D = p.D;
  float* xs = scratch;          // (D,) the row, widened or recomputed
  float* os = scratch + D;      // (D,) o widened
  float* mods = scratch + 2 * D;  // (5, D) shift, scale, gate, shift2, scale2 widened (bf16/fp16 only)
  // (D,) the weight, the same for every row: widened once per task (read in place when fp32).
  const float* weight = p.weight.data ? float_row(p.weight.data, p.weight.dtype, D, scratch + 7 * D) : nullptr;
  const size_t x_elem = c10::elementSize(p.x.dtype), o_elem = c10::elementSize(p.o.dtype);
  const size_t y_elem = c10::elementSize(p.y_dtype);
  int64_t cur_b = -1;
  const float *shift = nullptr, *scale = nullptr, *gate = nullptr, *shift2 = nullptr, *scale2 = nullptr;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / p.T, t = row % p.T;
    if (b != cur_b) {  // modulation is per sample: widened once per run of rows of the same sample
      shift = modulation_row(p.shift, b, D, mods);
      scale = modulation_row(p.scale, b, D, mods + D);
      if (p.gated) gate = modulation_row(p.gate, b, D, mods + 2 * D);
      if (p.y2) {
        shift2 = modulation_row(p.shift2, b, D, mods + 3 * D);
        scale2 = modulation_row(p.scale2, b, D, mods + 4 * D);
      }
      cur_b = b;
    }
    const char* x_row = static_cast<const char*>(p.x.data) + (b * p.x.stride_b + t * p.x.stride_t) * x_elem;
    const float* xf;
    float sum;
    if (p.gated) {
      const char* o_row = static_cast<const char*>(p.o.data) + (b * p.o.stride_b + t * p.o.stride_t) * o_elem;
      char* xo_row = static_cast<char*>(p.x_out) + (b * p.x_out_stride_b + t * p.x_out_stride_t) * x_elem;
      // The common pairings read o in its own type inside the residual loop; the others widen it first.
      if (p.x.dtype == at::kFloat && p.o.dtype == at::kBFloat16) {
        residual(reinterpret_cast<const float*>(x_row), gate, reinterpret_cast<const uint16_t*>(o_row), D,
                 reinterpret_cast<float*>(xo_row), xs);
      } else if (p.x.dtype == at::kBFloat16 && p.o.dtype == at::kBFloat16) {
        residual(reinterpret_cast<const uint16_t*>(x_row), gate, reinterpret_cast<const uint16_t*>(o_row), D,
                 reinterpret_cast<uint16_t*>(xo_row), xs);
      } else {
        const float* of = float_row(o_row, p.o.dtype, D, os);
        switch (p.x.dtype) {
          case at::kFloat:
            residual(reinterpret_cast<const float*>(x_row), gate, of, D, reinterpret_cast<float*>(xo_row), xs);
            break;
          case at::kBFloat16:
            residual(reinterpret_cast<const uint16_t*>(x_row), gate, of, D, reinterpret_cast<uint16_t*>(xo_row),
                     xs);
            break;
          default:
            residual(reinterpret_cast<const c10::Half*>(x_row), gate, of, D, reinterpret_cast<c10::Half*>(xo_row),
                     xs);
        }
      }
      xf = xs;
      sum = lane_sum(D, [&](int64_t i) { return stat<kRms>(xs[i]); });
    } else {
      switch (p.x.dtype) {
        case at::kFloat: {
          const float* xr = reinterpret_cast<const float*>(x_row);
          sum = lane_sum(D, [&](int64_t i) { return stat<kRms>(xr[i]); });
          xf = xr;
          break;
        }
        case at::kBFloat16: sum = widen_sum<kRms>(reinterpret_cast<const uint16_t*>(x_row), D, xs); xf = xs; break;
        default: sum = widen_sum<kRms>(reinterpret_cast<const c10::Half*>(x_row), D, xs); xf = xs;
      }
    }
    // RMSNorm: the mean of squares is the whole statistic, in one pass. An Inf makes it Inf and rstd 0, so
    // the row's finite elements give shift and the Inf itself NaN, as the eager x * rsqrt(mean(x^2) + eps).
    const float mean = kRms ? 0.f : sum / static_cast<float>(D);
    const float rstd = kRms ? 1.f / std::sqrt(sum / static_cast<float>(D) + p.eps) : row_rstd(xf, D, mean, p.eps);
    modulate_into(p.y_dtype, static_cast<char*>(p.y) + row * D * y_elem, xf, mean, rstd, weight, shift, scale, D);
    if (p.y2)  // the row is still in L1: the second modulation costs its write alone
      modulate_into(p.y_dtype, static_cast<char*>(p.y2) + row * D * y_elem, xf, mean, rstd, weight, shift2, scale2,
                    D);
  }
}

// One variant per ISA and statistic: the statistic decides the reduction loops, so it is a template argument
// rather than a branch inside them.
using RowsFn = void (*)(const AdalnParams&, int64_t, int64_t, float*);
template <bool kRms>
DITENGINE_TARGET_AVX512 void adaln_rows_avx512(const AdalnParams& p, int64_t b, int64_t e, float* s) {
  adaln_rows<kRms>(p, b, e, s);
}
template <bool kRms>
DITENGINE_TARGET_AVX2 void adaln_rows_avx2(const AdalnParams& p, int64_t b, int64_t e, float* s) {
  adaln_rows<kRms>(p, b, e, s);
}
template <bool kRms>
void adaln_rows_baseline(const AdalnParams& p, int64_t b, int64_t e, float* s) {
  adaln_rows<kRms>(p, b, e, s);
}

void run(const AdalnParams& p, bool rms, int64_t rows) {
  static const RowsFn layer_fn =
      cpu::pick<RowsFn>(adaln_rows_avx512<false>, adaln_rows_avx2<false>, adaln_rows_baseline<false>);
  static const RowsFn rms_fn =
      cpu::pick<RowsFn>(adaln_rows_avx512<true>, adaln_rows_avx2<true>, adaln_rows_baseline<true>);
  if (rows == 0 || p.D == 0) return;
  const RowsFn rows_fn = rms ? rms_fn : layer_fn;
  // Enough elements per task that thread start-up (a few microseconds) stays small next to the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.D);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(8 * p.D);  // (8, D) per task, reused by all its rows
    rows_fn(p, begin, end, scratch.data());
  });
}

// -- argument checks: every failure names the op, the argument and what was expected -------------------------
// They are kernels/adaln.py's `_check_inputs` (the public functions' and the ops' Python body's one check) in C++:
// the same exception type for the same mistake (csrc/checks.h), a message naming the same argument. One rule of
// Python's is not here: D <= MAX_D (16384). That is the Triton kernel's limit (one row of next_pow2(D) lanes per
// program); this kernel keeps a task's rows in a heap scratch of 8 * D floats and has no limit of its own. The
// public functions refuse D > MAX_D on every backend (a model then behaves the same on a CPU and on a GPU); a
// direct call of the op on CPU tensors takes any D here, as the op's reference body does.
Strided activation(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  check_float_cpu(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, ": expected shape ", shape, " (B, T, D), got ", t.sizes());
  return {t.data_ptr(), t.scalar_type(), t.stride(0), t.stride(1)};
}

Strided modulation(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t D) {
  check_float_cpu(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == D, op, ": ", name, ": expected shape (", B, ", ",
                    D, ") (B, D), got ", t.sizes());
  return {t.data_ptr(), t.scalar_type(), t.stride(0), 0};
}

Strided norm_weight(const char* op, const std::optional<at::Tensor>& weight, int64_t D) {
  if (!weight.has_value()) return {nullptr, at::kFloat, 0, 0};
  const at::Tensor& w = *weight;
  check_float_cpu(op, "weight", w);
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == D, op, ": weight: expected shape (", D,
                    ",) (D,) like x's last dim, got ", w.sizes());
  return {w.data_ptr(), w.scalar_type(), 0, 0};
}

AdalnParams prepare(const char* op, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                    double eps, at::ScalarType out_dtype, const std::optional<at::Tensor>& weight) {
  check_float_cpu(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x: expected 3 dimensions (B, T, D), got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float(out_dtype), op, ": out_dtype: expected float32, float16 or bfloat16, got ", out_dtype);
  // As the Python launchers (kernels/adaln.py `_check_eps`): 0 would divide a constant row by zero.
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps: expected a finite number > 0, got ", eps);
  AdalnParams p{};
  const int64_t B = x.size(0);
  p.T = x.size(1);
  p.D = x.size(2);
  p.eps = static_cast<float>(eps);
  p.x = activation(op, "x", x, x.sizes());
  p.shift = modulation(op, "shift", shift, B, p.D);
  p.scale = modulation(op, "scale", scale, B, p.D);
  p.weight = norm_weight(op, weight, p.D);
  p.y_dtype = out_dtype;
  return p;
}

at::Tensor adaln_modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                          at::ScalarType out_dtype, bool rms, const std::optional<at::Tensor>& weight) {
  AdalnParams p = prepare("ditengine::adaln_modulate", x, shift, scale, eps, out_dtype, weight);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));  // (B, T, D)
  p.gated = false;
  p.y = y.data_ptr();
  run(p, rms, x.size(0) * x.size(1));
  return y;
}

// The second modulation of the dual ops: y2 (B, T, D) in out_dtype, returned.
at::Tensor add_second(const char* op, AdalnParams& p, const at::Tensor& x, const at::Tensor& shift2,
                      const at::Tensor& scale2) {
  p.shift2 = modulation(op, "shift2", shift2, x.size(0), p.D);
  p.scale2 = modulation(op, "scale2", scale2, x.size(0), p.D);
  at::Tensor y2 = at::empty(x.sizes(), x.options().dtype(p.y_dtype));
  p.y2 = y2.data_ptr();
  return y2;
}

std::tuple<at::Tensor, at::Tensor> adaln_modulate_dual(const at::Tensor& x, const at::Tensor& shift,
                                                       const at::Tensor& scale, const at::Tensor& shift2,
                                                       const at::Tensor& scale2, double eps, at::ScalarType out_dtype,
                                                       bool rms, const std::optional<at::Tensor>& weight) {
  const char* op = "ditengine::adaln_modulate_dual";
  AdalnParams p = prepare(op, x, shift, scale, eps, out_dtype, weight);
  at::Tensor y2 = add_second(op, p, x, shift2, scale2);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));  // (B, T, D)
  p.gated = false;
  p.y = y.data_ptr();
  run(p, rms, x.size(0) * x.size(1));
  return {y, y2};
}

// Shared by the functional and the in-place op: x_out is a fresh tensor or x itself.
// `p` comes prepared (with a second modulation or without).
at::Tensor gated(const char* op, AdalnParams& p, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& o,
                 bool rms, const at::Tensor& x_out) {
  const at::ScalarType out_dtype = p.y_dtype;
  p.gated = true;
  p.o = activation(op, "o", o, x.sizes());
  p.gate = modulation(op, "gate", gate, x.size(0), p.D);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));  // (B, T, D)
  p.y = y.data_ptr();
  p.x_out = x_out.data_ptr();
  p.x_out_stride_b = x_out.stride(0);
  p.x_out_stride_t = x_out.stride(1);
  run(p, rms, x.size(0) * x.size(1));
  return y;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_adaln(const at::Tensor& x, const at::Tensor& gate,
                                                        const at::Tensor& o, const at::Tensor& shift,
                                                        const at::Tensor& scale, double eps,
                                                        at::ScalarType out_dtype, bool rms,
                                                        const std::optional<at::Tensor>& weight) {
  const char* op = "ditengine::gated_residual_adaln";
  check_float_cpu(op, "x", x);
  at::Tensor x_new = at::empty(x.sizes(), x.options());  // (B, T, D), contiguous like the Python op's
  AdalnParams p = prepare(op, x, shift, scale, eps, out_dtype, weight);
  at::Tensor y = gated(op, p, x, gate, o, rms, x_new);
  return {x_new, y};
}

at::Tensor gated_residual_adaln_(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& o,
                                 const at::Tensor& shift, const at::Tensor& scale, double eps,
                                 at::ScalarType out_dtype, bool rms, const std::optional<at::Tensor>& weight) {
  const char* op = "ditengine::gated_residual_adaln_";
  AdalnParams p = prepare(op, x, shift, scale, eps, out_dtype, weight);
  return gated(op, p, x, gate, o, rms, x);
}

std::tuple<at::Tensor, at::Tensor> gated_residual_adaln_dual_(const at::Tensor& x, const at::Tensor& gate,
                                                              const at::Tensor& o, const at::Tensor& shift,
                                                              const at::Tensor& scale, const at::Tensor& shift2,
                                                              const at::Tensor& scale2, double eps,
                                                              at::ScalarType out_dtype, bool rms,
                                                              const std::optional<at::Tensor>& weight) {
  const char* op = "ditengine::gated_residual_adaln_dual_";
  AdalnParams p = prepare(op, x, shift, scale, eps, out_dtype, weight);
  at::Tensor y2 = add_second(op, p, x, shift2, scale2);
  at::Tensor y = gated(op, p, x, gate, o, rms, x);
  return {y, y2};
}

}  // namespace

// The schemas are defined in Python (kernels/adaln.py, torch.library.custom_op); this only adds the CPU kernel,
// which the dispatcher prefers to the Python op's CompositeExplicitAutograd implementation on CPU tensors.
DITENGINE_CPU_OP("adaln_modulate", adaln_modulate)
DITENGINE_CPU_OP("gated_residual_adaln", gated_residual_adaln)
DITENGINE_CPU_OP("gated_residual_adaln_", gated_residual_adaln_)
DITENGINE_CPU_OP("adaln_modulate_dual", adaln_modulate_dual)
DITENGINE_CPU_OP("gated_residual_adaln_dual_", gated_residual_adaln_dual_)

}  // namespace ditengine
