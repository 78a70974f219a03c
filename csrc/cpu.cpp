#include "cpu.h"

#include <cstdlib>
#include <cstring>

namespace ditengine {
namespace cpu {

namespace {

Isa detect() {
#if DITENGINE_X86
  __builtin_cpu_init();
  Isa best = Isa::baseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
  Isa cap = Isa::avx512;
  if (const char* want = std::getenv("DITENGINE_ISA")) {
    if (std::strcmp(want, "avx2") == 0) cap = Isa::avx2;
    if (std::strcmp(want, "baseline") == 0) cap = Isa::baseline;
  }
  return best < cap ? best : cap;
#else
  return Isa::baseline;
#endif
}

}  // namespace

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace ditengine
