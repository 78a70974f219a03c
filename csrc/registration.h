// One registration for every op of the extension.
#pragma once

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

// DITENGINE_CPU_OP("name", kernel) registers `kernel` as the CPU implementation of ditengine::name, and torch's C++
// not-implemented fallback as its AutogradCPU one: the ops have no derivative, and the fallback gives CPU tensors
// the Python op's behaviour (outputs whose backward raises) without a trip through Python on every call, which
// costs more than the kernels at DiT-S sizes. Each use expands to two uniquely named TORCH_LIBRARY_IMPL blocks.
#define DITENGINE_CPU_OP(name, kernel)                                                     \
  TORCH_LIBRARY_IMPL(ditengine, CPU, m) { m.impl(name, &kernel); }                         \
  TORCH_LIBRARY_IMPL(ditengine, AutogradCPU, m) {                                          \
    m.impl(name, torch::autograd::autogradNotImplementedFallback());                       \
  }
