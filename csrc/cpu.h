// Shared by the native CPU kernels: run-time ISA choice, per-ISA function variants, and fp32 <-> bf16/fp16
// conversions written so that the compiler vectorises them.
//
// One binary serves every x86-64 CPU: a kernel's row loop is compiled three times (AVX-512, AVX2+FMA, and
// the x86-64 baseline) from one always-inline body, and a function pointer picks the variant once, from
// what the CPU reports. The build never uses -march=native, so a wheel built here runs anywhere.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include <c10/util/Half.h>

#if defined(__GNUC__)
#define DITENGINE_INLINE inline __attribute__((always_inline))
#else
#define DITENGINE_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define DITENGINE_X86 1
// AVX-512 BW/VL/DQ come with every AVX-512 CPU since Skylake-SP and give the 16-bit narrowing stores
// (vpmovdw) that bf16 output needs; 512-bit vectors are asked for explicitly because GCC's generic tuning
// may otherwise stay at 256 bits.
#define DITENGINE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define DITENGINE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define DITENGINE_X86 0
#define DITENGINE_TARGET_AVX512
#define DITENGINE_TARGET_AVX2
#endif

namespace ditengine {
namespace cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The best ISA this CPU runs, capped by DITENGINE_ISA=avx2|baseline (to test or compare the lower paths).
// Decided once per process.
Isa isa();
const char* isa_name(Isa isa);

// Picks one of three variants of a function by isa().
template <class Fn>
Fn pick(Fn avx512, Fn avx2, Fn baseline) {
  switch (isa()) {
    case Isa::avx512: return avx512;
    case Isa::avx2: return avx2;
    default: return baseline;
  }
}

// bf16 is the upper half of an fp32: widening is a shift, which vectorises (vpmovzxwd + vpslld).
DITENGINE_INLINE float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN to the canonical quiet NaN 0x7FC0: the same bits as torch's
// `.to(torch.bfloat16)` (c10::BFloat16's round_to_nearest_even), written branch-free so that it
// vectorises as add + compare + blend + narrowing store.
DITENGINE_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

// The element types the kernels read and write; bf16 is handled as its bit pattern.
template <class T>
struct Elem;
template <>
struct Elem<float> {
  static DITENGINE_INLINE float load(const float* p, int64_t i) { return p[i]; }
  static DITENGINE_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
  static DITENGINE_INLINE float round(float v) { return v; }
};
template <>
struct Elem<uint16_t> {  // bf16
  static DITENGINE_INLINE float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static DITENGINE_INLINE void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
  static DITENGINE_INLINE float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};
template <>
struct Elem<c10::Half> {  // fp16: c10's IEEE conversions, correct everywhere; not a speed target
  static DITENGINE_INLINE float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
  static DITENGINE_INLINE void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
  static DITENGINE_INLINE float round(float v) { return static_cast<float>(c10::Half(v)); }
};

// Number of independent partial sums in a row reduction. Explicit lanes let the compiler vectorise the sum
// without reassociating (no -ffast-math) and make the order of additions, hence the bits, the same for
// every ISA variant and every run. 64 lanes are 4 AVX-512 or 8 AVX2 accumulators: enough independent
// chains to hide the add/FMA latency, which 16 lanes (1 or 2 chains) do not.
constexpr int kLanes = 64;

template <int W>
DITENGINE_INLINE void fold(float* acc) {
  for (int j = 0; j < W; ++j) acc[j] += acc[j + W];
}

// Pairwise (tree) sum of the lanes: vectorised halvings of constant width instead of a 64-long chain.
DITENGINE_INLINE float sum_lanes(float* acc) {
  static_assert(kLanes == 64, "sum_lanes folds 64 lanes");
  fold<32>(acc);
  fold<16>(acc);
  fold<8>(acc);
  fold<4>(acc);
  fold<2>(acc);
  fold<1>(acc);
  return acc[0];
}

}  // namespace cpu
}  // namespace ditengine
