// The input checks the ops' CPU kernels share. Each message names the op and the argument, and raises the error
// type Python's checks raise for the same mistake (ValueError for a value, TypeError for a dtype).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <string>

namespace ditengine {

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// -- Python's spelling, for the ops whose messages are kernels/_checks.py's (check_tensor's) word for word ----------
// A dtype as Python prints it without "torch.": float32, bfloat16, int64 (at::ScalarType's own name otherwise).
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

// A list of dtypes as Python prints a list of their names: ['float32', 'float16', 'bfloat16'].
inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s = "[";
  for (const at::ScalarType t : dtypes) {
    if (s.size() > 1) s += ", ";
    s += std::string("'") + dtype_name(t) + "'";
  }
  return s + "]";
}

// Sizes or strides as Python prints a tuple: (2, 4, 4), (5,), ().
inline std::string tuple_str(at::IntArrayRef values) {
  std::string s = "(";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + (values.size() == 1 ? ",)" : ")");
}

// check_tensor's dtype rule: "<op>: <name>: expected dtype in ['float32', ...], got int32", a TypeError.
inline void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> dtypes) {
  bool ok = false;
  for (const at::ScalarType d : dtypes) ok = ok || t.scalar_type() == d;
  TORCH_CHECK_TYPE(ok, op, ": ", name, ": expected dtype in ", dtype_list(dtypes), ", got ",
                   dtype_name(t.scalar_type()));
}

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
