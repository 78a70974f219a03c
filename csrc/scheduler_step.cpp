// Native CPU kernel of the fused scheduler step; see kernels/scheduler_step.py for the formulas, the
// table's columns and the Python definition of the op.
//
//     m      = u + cfg_scale * (c - u)                     # first `guided_channels` channels; c elsewhere
//     x0     = clamp(p*x + q*m, -clip, clip)               # clamp only with `clip`
//     x_next = r*x0 + s*x + w*m + h*hist + h2*hist2 + u*z  # u scaled element-wise by the learned variance if asked
//     hist2  = hist ;  hist = x0 ;  next_input = x_next * c_in_next (written twice when 2B)
//
// The work is split into (b, c) planes of H*W contiguous elements, planes spread over threads. A plane is
// walked in chunks that fit L1: inputs are widened to fp32 scratch (or read in place when already fp32),
// the arithmetic runs in fp32 over the chunk, and each output is written once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu.h"
#include "checks.h"
#include "registration.h"

namespace ditengine {
namespace {

using cpu::Elem;

constexpr int64_t kChunk = 512;  // elements per chunk: 5 fp32 scratch rows of 2 KiB

// Column order of the scheduler table (ditengine.schedulers.COLUMNS; kernels/scheduler_step.py checks it).
enum Col { P, Q, CLIP, R, S, W, H, U, LOGVAR_MIN, LOGVAR_MAX, C_IN, C_IN_NEXT, H2, NUM_COLUMNS };

struct StepParams {
  int64_t B, C, HW, model_c;
  const void* x;
  at::ScalarType x_dtype;
  const void* model_out;  // (B or 2B, C or 2C, H, W)
  at::ScalarType m_dtype;
  float* history;      // (B, C, H, W) fp32 or null
  float* history2;     // (B, C, H, W) fp32 or null; only with history
  const float* noise;  // (B, C, H, W) fp32 or null
  void* out;
  at::ScalarType out_dtype;
  void* next_input;  // (B or 2B, C, H, W) or null
  at::ScalarType next_dtype;
  bool next_twice, has_cfg, clip, learned;
  int64_t guided_channels;
  float cfg_scale;
  float coef[NUM_COLUMNS];
};

template <class T>
DITENGINE_INLINE void widen(const T* src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Elem<T>::load(src, i);
}

template <class T>
DITENGINE_INLINE void narrow(const float* __restrict__ src, float scale, int64_t n, T* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) Elem<T>::store(dst, i, src[i] * scale);
}

// An fp32 view of n elements starting at element `offset`: fp32 is read in place, bf16/fp16 widened.
DITENGINE_INLINE const float* float_span(const void* base, at::ScalarType dtype, int64_t offset, int64_t n,
                                         float* scratch) {
  switch (dtype) {
    case at::kFloat: return static_cast<const float*>(base) + offset;
    case at::kBFloat16: widen(static_cast<const uint16_t*>(base) + offset, n, scratch); return scratch;
    default: widen(static_cast<const c10::Half*>(base) + offset, n, scratch); return scratch;
  }
}

DITENGINE_INLINE void store_span(const float* src, float scale, void* base, at::ScalarType dtype, int64_t offset,
                                 int64_t n) {
  switch (dtype) {
    case at::kFloat: narrow(src, scale, n, static_cast<float*>(base) + offset); break;
    case at::kBFloat16: narrow(src, scale, n, static_cast<uint16_t*>(base) + offset); break;
    default: narrow(src, scale, n, static_cast<c10::Half*>(base) + offset);
  }
}

DITENGINE_INLINE void step_planes(const StepParams& p, int64_t begin, int64_t end, float* scratch) {
  float* s_m = scratch;
  float* s_u = scratch + kChunk;
  float* s_x = scratch + 2 * kChunk;
  float* s_0 = scratch + 3 * kChunk;
  float* s_n = scratch + 4 * kChunk;
  const float* k = p.coef;
  const float cp = k[P], cq = k[Q], lim = k[CLIP], cr = k[R], cs = k[S], cw = k[W], ch = k[H], cu = k[U];
  const float ch2 = k[H2];
  const float lmin = k[LOGVAR_MIN], lrange = k[LOGVAR_MAX] - k[LOGVAR_MIN];
  const int64_t N = p.B * p.C * p.HW;
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t b = plane / p.C, c = plane % p.C;
    const int64_t x_off = plane * p.HW;
    const int64_t cond_off = (b * p.model_c + c) * p.HW;  // conditional half, prediction channel c
    const int64_t uncond_off = cond_off + p.B * p.model_c * p.HW;
    const int64_t var_off = cond_off + p.C * p.HW;  // learned-variance channel c
    const bool guide = p.has_cfg && c < p.guided_channels;
    for (int64_t j = 0; j < p.HW; j += kChunk) {
      const int64_t n = std::min(kChunk, p.HW - j);
      const float* m = float_span(p.model_out, p.m_dtype, cond_off + j, n, s_m);
      if (guide) {
        const float* u = float_span(p.model_out, p.m_dtype, uncond_off + j, n, s_u);
        // m may be s_m itself (widened): element i is read before it is overwritten.
        for (int64_t i = 0; i < n; ++i) s_m[i] = u[i] + p.cfg_scale * (m[i] - u[i]);
        m = s_m;
      }
      const float* x = float_span(p.x, p.x_dtype, x_off + j, n, s_x);
      for (int64_t i = 0; i < n; ++i) {
        float x0 = cp * x[i] + cq * m[i];
        // Comparisons are false for NaN, so a NaN passes through the clamp like torch.clamp's.
        if (p.clip) x0 = x0 < -lim ? -lim : (x0 > lim ? lim : x0);
        s_0[i] = x0;
        s_n[i] = cr * x0 + cs * x[i] + cw * m[i];
      }
      if (p.history2) {
        float* hist = p.history + x_off + j;
        float* hist2 = p.history2 + x_off + j;
        for (int64_t i = 0; i < n; ++i) {
          s_n[i] += ch * hist[i];
          s_n[i] += ch2 * hist2[i];
          hist2[i] = hist[i];
          hist[i] = s_0[i];
        }
      } else if (p.history) {
        float* hist = p.history + x_off + j;
        for (int64_t i = 0; i < n; ++i) {
          s_n[i] += ch * hist[i];
          hist[i] = s_0[i];
        }
      }
      if (p.noise) {
        const float* z = p.noise + x_off + j;
        if (p.learned) {
          const float* v = float_span(p.model_out, p.m_dtype, var_off + j, n, s_u);
          for (int64_t i = 0; i < n; ++i)
            s_n[i] += cu * std::exp(0.5f * (lmin + (v[i] + 1.f) * 0.5f * lrange)) * z[i];
        } else {
          for (int64_t i = 0; i < n; ++i) s_n[i] += cu * z[i];
        }
      }
      store_span(s_n, 1.f, p.out, p.out_dtype, x_off + j, n);
      if (p.next_input) {
        store_span(s_n, k[C_IN_NEXT], p.next_input, p.next_dtype, x_off + j, n);
        if (p.next_twice) store_span(s_n, k[C_IN_NEXT], p.next_input, p.next_dtype, N + x_off + j, n);
      }
    }
  }
}

using PlanesFn = void (*)(const StepParams&, int64_t, int64_t, float*);
DITENGINE_TARGET_AVX512 void step_planes_avx512(const StepParams& p, int64_t b, int64_t e, float* s) {
  step_planes(p, b, e, s);
}
DITENGINE_TARGET_AVX2 void step_planes_avx2(const StepParams& p, int64_t b, int64_t e, float* s) {
  step_planes(p, b, e, s);
}
void step_planes_baseline(const StepParams& p, int64_t b, int64_t e, float* s) { step_planes(p, b, e, s); }

// -- argument checks: every failure names the op and the argument, in the words, order and exception types of
// the Python checks (`_check_args` in kernels/scheduler_step.py), except that a tensor must be on the CPU --------
constexpr const char* kOp = "ditengine::scheduler_step";

// A state or output tensor: dtype one of `dtypes` (TypeError), on the CPU, contiguous; the shape of x when given.
void check(const char* name, const at::Tensor& t, std::initializer_list<at::ScalarType> dtypes,
           at::IntArrayRef shape = {}) {
  if (!shape.empty()) {
    TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, ": expected shape ", tuple_str(shape), " like x, got ",
                      tuple_str(t.sizes()));
  }
  check_dtype_in(kOp, name, t, dtypes);
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": ", name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, ": expected a contiguous tensor, got strides ",
                    tuple_str(t.strides()));
}

const std::initializer_list<at::ScalarType> kFloats = {at::kFloat, at::kHalf, at::kBFloat16};

void scheduler_step(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
                    const std::optional<at::Tensor>& step_tensor, int64_t step_int, const at::Tensor& out,
                    const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& noise,
                    const std::optional<at::Tensor>& next_input, double cfg_scale, bool has_cfg,
                    int64_t guided_channels, bool clip, bool learned, const std::optional<at::Tensor>& history2) {
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x: expected 4 dimensions (B, C, H, W), got shape ", tuple_str(x.sizes()));
  check("x", x, kFloats);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  // Without CFG the op takes B or 2B rows (reading the first B).
  TORCH_CHECK_VALUE(model_out.dim() == 4 && (model_out.size(0) == 2 * B || (!has_cfg && model_out.size(0) == B)) &&
                        (model_out.size(1) == C || model_out.size(1) == 2 * C) &&
                        model_out.size(2) == x.size(2) && model_out.size(3) == x.size(3),
                    kOp, ": model_out: expected shape (", has_cfg ? "" : std::to_string(B) + " or ", 2 * B, ", ", C,
                    " or ", 2 * C, ", ", x.size(2), ", ", x.size(3), ")", has_cfg ? " with CFG (batch doubled)" : "",
                    ", got ", tuple_str(model_out.sizes()));
  TORCH_CHECK_VALUE(!learned || model_out.size(1) == 2 * C, kOp, ": model_out: learned needs ", 2 * C,
                    " channels (prediction + variance), got ", model_out.size(1));
  check("model_out", model_out, kFloats);
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == NUM_COLUMNS, kOp, ": table: expected shape (steps, ",
                    int(NUM_COLUMNS), "), got ", tuple_str(table.sizes()));
  check("table", table, {at::kFloat});
  int64_t step = step_int;
  if (step_tensor.has_value()) {
    const at::Tensor& st = *step_tensor;
    check_dtype_in(kOp, "step_tensor", st, {at::kInt, at::kLong});
    TORCH_CHECK_VALUE(st.device().is_cpu(), kOp, ": step_tensor: expected a CPU tensor, got one on ", st.device());
    TORCH_CHECK_VALUE(st.numel() == 1, kOp, ": step_tensor: expected a one-element tensor, got shape ",
                      tuple_str(st.sizes()));
    // A CPU tensor: reading it is a load, not a device sync.
    step = st.scalar_type() == at::kLong ? *st.data_ptr<int64_t>() : *st.data_ptr<int32_t>();
  }
  TORCH_CHECK_INDEX(step >= 0 && step < table.size(0), kOp, ": step=", step, " out of range for a table of ",
                    table.size(0), " steps");
  check("out", out, kFloats, x.sizes());
  if (history.has_value()) check("history", *history, {at::kFloat}, x.sizes());
  if (history2.has_value()) check("history2", *history2, {at::kFloat}, x.sizes());
  TORCH_CHECK_VALUE(!history2.has_value() || history.has_value(), kOp,
                    ": history2: needs history (the step moves history into history2)");
  if (noise.has_value()) check("noise", *noise, {at::kFloat}, x.sizes());
  bool next_twice = false;
  if (next_input.has_value()) {
    const at::Tensor& ni = *next_input;
    TORCH_CHECK_VALUE(ni.dim() == 4 && (ni.size(0) == B || ni.size(0) == 2 * B) && ni.size(1) == C &&
                          ni.size(2) == x.size(2) && ni.size(3) == x.size(3),
                      kOp, ": next_input: expected shape (", B, " or ", 2 * B, ", ", C, ", ", x.size(2), ", ",
                      x.size(3), "), got ", tuple_str(ni.sizes()));
    check("next_input", ni, kFloats);
    next_twice = ni.size(0) == 2 * B;
  }
  TORCH_CHECK_VALUE(guided_channels >= 0 && guided_channels <= C, kOp, ": guided_channels=", guided_channels,
                    ": expected 0..", C);

  StepParams p{};
  p.B = B;
  p.C = C;
  p.HW = HW;
  p.model_c = model_out.size(1);
  p.x = x.data_ptr();
  p.x_dtype = x.scalar_type();
  p.model_out = model_out.data_ptr();
  p.m_dtype = model_out.scalar_type();
  p.history = history.has_value() ? history->data_ptr<float>() : nullptr;
  p.history2 = history2.has_value() ? history2->data_ptr<float>() : nullptr;
  p.noise = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = out.scalar_type();
  p.next_input = next_input.has_value() ? next_input->data_ptr() : nullptr;
  p.next_dtype = next_input.has_value() ? next_input->scalar_type() : at::kFloat;
  p.next_twice = next_twice;
  p.has_cfg = has_cfg;
  p.clip = clip;
  p.learned = learned;
  p.guided_channels = guided_channels;
  p.cfg_scale = static_cast<float>(cfg_scale);
  std::copy_n(table.data_ptr<float>() + step * NUM_COLUMNS, int(NUM_COLUMNS), p.coef);

  static const PlanesFn planes_fn = cpu::pick<PlanesFn>(step_planes_avx512, step_planes_avx2, step_planes_baseline);
  const int64_t planes = B * C;
  if (planes == 0 || HW == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / HW);  // tasks of at least ~32K elements
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    float scratch[5 * kChunk];
    planes_fn(p, begin, end, scratch);
  });
}

}  // namespace

// The schema is defined in Python (kernels/scheduler_step.py); this adds the CPU kernel.
DITENGINE_CPU_OP("scheduler_step", scheduler_step)

}  // namespace ditengine
