// Shared pieces of the native CPU kernels (included by csrc/*.cpp; not a translation unit itself):
// the fp32 GEMM on raw strided pointers and the AVX2 exp, both chosen at run time (no -march flags at
// build time: the extension runs on any x86-64, fast where the CPU has AVX2 + FMA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DITENGINE_X86 1
#endif

namespace ditengine {
namespace cpu {

// -- row-major fp32 GEMMs -----------------------------------------------------------------------------
// Straight to the BLAS torch links (MKL or OpenBLAS export the Fortran sgemm_): a tile's GEMM is tens of
// microseconds, and ATen's addmm adds several microseconds of dispatch and view bookkeeping per call.
// The symbol is weak, so a torch built without BLAS still loads this file and runs at::addmm_out.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

inline at::Tensor matrix_view(const float* p, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {row_stride, col_stride}, at::kFloat);
}

// C (m x n, row stride ldc) = alpha * A (m x k, row stride lda) . B^T + beta * C, B stored (n x k) with row
// stride ldb when `b_transposed`, else C = alpha * A . B with B stored (k x n). With beta = 0, C is not read.
//
// C = A . B (+ C), the attention kernels' form (alpha = 1, beta 0 or 1, B stored (k x n)), goes to oneDNN's
// brgemm micro-kernel through ATen (`at::native::cpublas::brgemm`, what torch's own CPU flash attention
// calls): at attention's tile shapes (64 x 256 x 64) it ran 3-7x the BLAS sgemm on the AVX-512 development
// CPU of 2026-12-02, whose MKL takes a slow path on AMD CPUs. Where oneDNN has no brgemm for the CPU,
// ATen falls back to its own GEMM.
inline void gemm(bool b_transposed, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!b_transposed && alpha == 1.f && (beta == 0.f || beta == 1.f) && m > 0 && n > 0 && k > 0) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta == 1.f, a, b, c, /*is_vnni=*/false);
    return;
  }
  // A single row's stride is never used; BLAS still checks it against the row length (as ATen does,
  // normalise it so that a 1-row view with any stride is accepted).
  if (m == 1) lda = std::max(lda, k), ldc = std::max(ldc, n);
  if (b_transposed ? n == 1 : k == 1) ldb = std::max(ldb, b_transposed ? k : n);
  const bool fits_int = std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX;
  if (sgemm_ != nullptr && fits_int) {
    // Column-major BLAS sees the row-major C as C^T = B^T-or-B . A^T.
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(b_transposed ? "T" : "N", "N", &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  at::Tensor out = matrix_view(c, m, n, ldc, 1);
  at::Tensor b_view = b_transposed ? matrix_view(b, n, k, ldb, 1).t() : matrix_view(b, k, n, ldb, 1);
  at::addmm_out(out, out, matrix_view(a, m, k, lda, 1), b_view, beta, alpha);
}

#ifdef DITENGINE_X86
#define DITENGINE_AVX2 __attribute__((target("avx2,fma")))

// exp on 8 lanes: Cody-Waite range reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial (Cephes
// expf, ~1 ulp), scaled by 2^n through the exponent bits. Inputs are clamped to [-87.3, 88.7] with the
// input as the second operand of max/min, which returns it when it is NaN: NaN propagates.
DITENGINE_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.7f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The same exp on 16 lanes, for the AVX-512 variants (attention's softmax, the GELU epilogue).
#define DITENGINE_AVX512F __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
DITENGINE_AVX512F inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
#endif

// -- dtype conversion of contiguous runs --------------------------------------------------------------
// Widening bf16 is a 16-bit shift and narrowing is round-to-nearest-even on the bits (NaN kept quiet), the
// same results as c10::BFloat16's scalar conversions, so vector bodies and scalar tails agree bit for bit.
#ifdef DITENGINE_X86
DITENGINE_AVX2 inline void widen_bf16_avx2(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

DITENGINE_AVX2 inline void narrow_bf16_avx2(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 8 x u16 in the low half
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
}
#endif

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
#ifdef DITENGINE_X86
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (cpu_has_avx2_fma()) return widen_bf16_avx2(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
    return;
  } else {
#ifdef DITENGINE_X86
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (cpu_has_avx2_fma()) return narrow_bf16_avx2(src, dst, n);
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// Whether the CPU multiplies bf16 tiles in hardware (AMX, as ATen's `cpublas::could_pack` reports for bf16). There,
// ATen's flash attention, whose tiles multiply bf16 blocks packed for AMX, beats the attention kernels' fp32
// dots in bf16 (csrc/attention.cpp, csrc/gqa_attention.cpp); elsewhere bf16 dots are emulated and fp32 wins.
inline bool bf16_tiles_in_hardware() {
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
}

}  // namespace cpu
}  // namespace ditengine
