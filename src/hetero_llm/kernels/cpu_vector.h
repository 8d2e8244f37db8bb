// fp32 vector helpers of the native CPU decode step (cpu_decode.cpp): one interface over AVX-512
// (16 lanes) and AVX2 (8 lanes), chosen by the build's flags, as the step itself is.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace hetero_llm_vec {

// Vector helpers: exp (Cephes' polynomial, ~2 ulp; inputs here are <= 0 or moderate), dot, |x| max.
#if defined(__AVX512VNNI__)
using vfloat = __m512;
constexpr int kLanes = 16;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vset(float v) { return _mm512_set1_ps(v); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
inline vfloat vabs(vfloat a) { return _mm512_abs_ps(a); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline vfloat vround(vfloat a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vsum(vfloat a) { return _mm512_reduce_add_ps(a); }
inline float vhmax(vfloat a) { return _mm512_reduce_max_ps(a); }
inline vfloat vpow2i(vfloat n) {  // 2^n for integral n in the normal range
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline void vstore_i8(int8_t* p, vfloat v) {  // v integral in [-127, 127]
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}
#else
using vfloat = __m256;
constexpr int kLanes = 8;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vset(float v) { return _mm256_set1_ps(v); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
inline vfloat vabs(vfloat a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline vfloat vround(vfloat a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vsum(vfloat a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vhmax(vfloat a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline vfloat vpow2i(vfloat n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline void vstore_i8(int8_t* p, vfloat v) {
  const __m256i i = _mm256_cvtps_epi32(v);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}
#endif

inline vfloat vexp(vfloat x) {
  x = vmax(vmin(x, vset(88.3f)), vset(-87.3f));
  const vfloat n = vround(vmul(x, vset(1.44269504088896341f)));
  x = vfma(n, vset(-0.693359375f), x);
  x = vfma(n, vset(2.12194440e-4f), x);
  vfloat y = vset(1.9875691500e-4f);
  y = vfma(y, x, vset(1.3981999507e-3f));
  y = vfma(y, x, vset(8.3334519073e-3f));
  y = vfma(y, x, vset(4.1665795894e-2f));
  y = vfma(y, x, vset(1.6666665459e-1f));
  y = vfma(y, x, vset(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), vadd(x, vset(1.f)));
  return vmul(y, vpow2i(n));
}

inline float expf_fast(float x) {  // the same polynomial, one value (loop tails)
  float buf[kLanes] = {x};
  vstore(buf, vexp(vload(buf)));
  return buf[0];
}

inline float dot(const float* a, const float* b, int64_t n) {
  vfloat acc = vset(0.f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace hetero_llm_vec
