// The input checks the ops' CPU kernels share. Each message names the op and the argument, and raises the error
// type Python's checks raise for the same mistake (ValueError for a value, TypeError for a dtype).
#pragma once

#include <ATen/core/Tensor.h>

namespace ditengine {

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// A tensor the CPU kernel can read: on the CPU.
inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, " (CPU kernel): ", name, " must be a CPU tensor, got ", t.device());
}

// An activation or weight: present, on the CPU, fp32 / fp16 / bf16, its last dimension contiguous.
inline void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, ": expected a tensor, got None");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), op, ": ", name, ": expected dtype float32, float16 or bfloat16, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    ": the last dimension must be contiguous (stride 1), got strides ", t.strides());
}

}  // namespace ditengine
