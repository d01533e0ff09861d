// CPU kernels of qcompiler's ops: per-row int8 activation quantization and the int8 GEMM.
//
//   s_r  = max(max_k |A[r,k]|, 1e-8) / 127            (k over the non-outlier channels)
//   q_rk = clip(round_half_even(A[r,k] / s_r), -127, 127)
//   C_rn = sum_k q_rk * B[n,k]                         (exact, int32)
//
// The GEMM has three code paths chosen at run time: AVX512-VNNI (vpdpbusd on q+128,
// with sum_k B[n,k] subtracted), AVX2 (sign-extend to int16, vpmaddwd) and portable C++.
// Environment variable QC_OPS_ISA=scalar|avx2|avx512vnni caps the path (for tests).
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

namespace qc {

constexpr float kPerTokenEps = 1e-8f;

// ---------------------------------------------------------------- float16 <-> float32

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t x;
  if (exp == 0) {
    float f = float(mant) * 5.9604644775390625e-8f;  // mant * 2^-24 (exact)
    memcpy(&x, &f, 4);
    x |= sign;
  } else if (exp == 31) {
    x = sign | 0x7F800000u | (mant << 13);
  } else {
    x = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  memcpy(&out, &x, 4);
  return out;
}

inline uint16_t float_to_half(float f) {  // round to nearest, ties to even
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal half
    float af;
    memcpy(&af, &a, 4);
    return uint16_t(sign | uint32_t(std::nearbyint(af * 16777216.0f)));
  }
  uint32_t h = ((((a >> 23) - 112u)) << 10) | ((a & 0x7FFFFFu) >> 13);
  uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

// ---------------------------------------------------------------- bfloat16 <-> float32

// bfloat16 storage (the upper half of a float32); a distinct type from float16's uint16_t.
struct bf16_t {
  uint16_t bits;
};

inline float bf16_to_float(bf16_t h) {  // exact
  uint32_t x = uint32_t(h.bits) << 16;
  float out;
  memcpy(&out, &x, 4);
  return out;
}

inline bf16_t float_to_bf16(float f) {  // round to nearest, ties to even; NaN stays NaN
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{uint16_t((x >> 16) | 0x40u)};
  x += 0x7FFFu + ((x >> 16) & 1u);
  return bf16_t{uint16_t(x >> 16)};
}

template <typename T>
inline float to_float(T v);
template <>
inline float to_float<float>(float v) { return v; }
template <>
inline float to_float<uint16_t>(uint16_t v) { return half_to_float(v); }
template <>
inline float to_float<bf16_t>(bf16_t v) { return bf16_to_float(v); }

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline uint16_t from_float<uint16_t>(float v) { return float_to_half(v); }
template <>
inline bf16_t from_float<bf16_t>(float v) { return float_to_bf16(v); }

// ---------------------------------------------------------------- activation quantization

// Round half to even for |v| <= 2^22 without libm: adding and subtracting 1.5 * 2^23
// leaves the float rounded to an integer in the current (nearest-even) rounding mode.
// (Compiled without -ffast-math, so the compiler keeps both operations.)
inline float round_even(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// Quantize `rows` rows of A (row stride K) into q (int8, stride K) and s (per row).
// `mask` (K bytes, may be null) marks outlier channels: they are left out of the row
// maximum and quantized to 0.  `a_out` (rows x R, may be null) receives A[r, idx[j]].
template <typename T>
void quantize_rows(const T* A, int64_t r0, int64_t r1, int64_t K, const uint8_t* mask, const int64_t* idx,
                   int64_t R, int8_t* q, float* s, float* a_out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = A + r * K;
    float amax = 0.f;
    if (mask) {
      for (int64_t k = 0; k < K; ++k)
        if (!mask[k]) amax = std::max(amax, std::fabs(to_float<T>(a[k])));
    } else {
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(to_float<T>(a[k])));
    }
    const float sr = std::max(amax, kPerTokenEps) / 127.0f;
    s[r] = sr;
    int8_t* qr = q + r * K;
    for (int64_t k = 0; k < K; ++k) {
      float v = to_float<T>(a[k]) / sr;
      v = std::min(std::max(v, -127.0f), 127.0f);
      qr[k] = int8_t(round_even(v));
    }
    if (mask) {
      for (int64_t k = 0; k < K; ++k)
        if (mask[k]) qr[k] = 0;
    }
    for (int64_t j = 0; j < R; ++j) a_out[r * R + j] = to_float<T>(a[idx[j]]);
  }
}

// ---------------------------------------------------------------- int8 GEMM  C[m, n] = q[m, :] . B[n, :]

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

inline Isa detect_isa() {
  Isa best = Isa::kScalar;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    best = Isa::kAvx512Vnni;
#endif
  const char* env = std::getenv("QC_OPS_ISA");
  if (env) {
    std::string e(env);
    Isa want = e == "scalar" ? Isa::kScalar : e == "avx2" ? Isa::kAvx2 : Isa::kAvx512Vnni;
    if (int(want) < int(best)) best = want;
  }
  return best;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512Vnni ? "avx512vnni" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

inline int32_t dot_scalar(const int8_t* a, const int8_t* b, int64_t K) {
  int32_t acc = 0;
  for (int64_t k = 0; k < K; ++k) acc += int32_t(a[k]) * int32_t(b[k]);
  return acc;
}

inline void gemm_scalar(const int8_t* q, const int8_t* B, int64_t K, int64_t m0, int64_t m1, int64_t n0,
                        int64_t n1, int32_t* C, int64_t ldc) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) C[m * ldc + n] = dot_scalar(q + m * K, B + n * K, K);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) inline int32_t dot_avx2(const int8_t* a, const int8_t* b, int64_t K) {
  __m256i acc = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i a16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k)));
    __m256i b16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a16, b16));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  int32_t out = _mm_cvtsi128_si32(s);
  for (; k < K; ++k) out += int32_t(a[k]) * int32_t(b[k]);
  return out;
}

__attribute__((target("avx2"))) inline void gemm_avx2(const int8_t* q, const int8_t* B, int64_t K, int64_t m0,
                                                      int64_t m1, int64_t n0, int64_t n1, int32_t* C,
                                                      int64_t ldc) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) C[m * ldc + n] = dot_avx2(q + m * K, B + n * K, K);
}

// vpdpbusd multiplies unsigned by signed bytes: feed q + 128 (q ^ 0x80) and subtract
// 128 * sum_k B[n, k], accumulated alongside as ones . B.
#define QC_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

QC_VNNI inline __mmask64 tail_mask(int64_t left) {
  return left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
}

QC_VNNI inline void tile_vnni_4x4(const int8_t* q, const int8_t* B, int64_t K, int64_t m, int64_t n, int32_t* C,
                                  int64_t ldc) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[4][4], bs[4];
  for (int j = 0; j < 4; ++j) {
    bs[j] = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = tail_mask(K - k);
    __m512i a[4], b[4];
    for (int i = 0; i < 4; ++i)
      a[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, q + (m + i) * K + k), flip);
    for (int j = 0; j < 4; ++j) b[j] = _mm512_maskz_loadu_epi8(mk, B + (n + j) * K + k);
    // masked-off lanes: a = 0x80 (128) but b = 0, so they add nothing.
    for (int j = 0; j < 4; ++j) {
      bs[j] = _mm512_dpbusd_epi32(bs[j], ones, b[j]);
      for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a[i], b[j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int32_t corr = 128 * _mm512_reduce_add_epi32(bs[j]);
    for (int i = 0; i < 4; ++i) C[(m + i) * ldc + n + j] = _mm512_reduce_add_epi32(acc[i][j]) - corr;
  }
}

QC_VNNI inline int32_t dot_vnni(const int8_t* a, const int8_t* b, int64_t K) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512(), bs = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = tail_mask(K - k);
    __m512i av = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, a + k), flip);
    __m512i bv = _mm512_maskz_loadu_epi8(mk, b + k);
    acc = _mm512_dpbusd_epi32(acc, av, bv);
    bs = _mm512_dpbusd_epi32(bs, ones, bv);
  }
  return _mm512_reduce_add_epi32(acc) - 128 * _mm512_reduce_add_epi32(bs);
}

QC_VNNI inline void gemm_vnni(const int8_t* q, const int8_t* B, int64_t K, int64_t m0, int64_t m1, int64_t n0,
                              int64_t n1, int32_t* C, int64_t ldc) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_vnni_4x4(q, B, K, m, n, C, ldc);
    for (; n < n1; ++n)
      for (int i = 0; i < 4; ++i) C[(m + i) * ldc + n] = dot_vnni(q + (m + i) * K, B + n * K, K);
  }
  for (; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) C[m * ldc + n] = dot_vnni(q + m * K, B + n * K, K);
}
#undef QC_VNNI
#endif

inline void gemm_i8(Isa isa, const int8_t* q, const int8_t* B, int64_t K, int64_t m0, int64_t m1, int64_t n0,
                    int64_t n1, int32_t* C, int64_t ldc) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512Vnni) return gemm_vnni(q, B, K, m0, m1, n0, n1, C, ldc);
  if (isa == Isa::kAvx2) return gemm_avx2(q, B, K, m0, m1, n0, n1, C, ldc);
#endif
  (void)isa;
  gemm_scalar(q, B, K, m0, m1, n0, n1, C, ldc);
}

}  // namespace qc
