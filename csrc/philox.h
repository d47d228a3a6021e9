// Philox4x32-10 and Box–Muller, host and device: the C++/CUDA twin of agm_fast/rng.py.
//
// Bit-compatible with rng.py (tested against it and against the Random123 known-answer
// vector ctr = key = 0 → 0x6627e8d5 0xe169c58d 0xbc57ac4c 0x9b00dbd8):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (element // 4, global image index, step, stream)
//   normals 0,1 = Box–Muller(r0, r1), normals 2,3 = Box–Muller(r2, r3)
//   uniform u = (float(r) + 0.5f) * 2^-32 in fp32 (never 0, so log(u) is finite)
// Every arithmetic step is written as rng.py evaluates it in fp32 so that the only
// differences are the last-ulp differences of log/cos/sin between math libraries.
// Plain C++ (no torch headers): nvcc compiles it on its own.
//
// After the scalar definition, host only (x86-64): normals_tile_avx2, the same normals for a
// tile of up to kTileBlocks blocks at once, for the CPU op.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if !defined(__CUDACC__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AGM_HAVE_AVX2_TILE 1
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define AGM_HD __host__ __device__ __forceinline__
#else
#define AGM_HD inline
#endif

namespace agm {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPowM32 = 2.3283064365386963e-10f;  // 2^-32, exact in fp32
constexpr float kTwoPi = 6.283185307179586f;            // rng.TWO_PI rounded to fp32, as torch does

// Noise streams: the 4th counter word. Must equal agm_fast.rng.Stream (never renumber).
constexpr uint32_t kStreamEM = 5u;

// CPU work item: at most this many Philox blocks (4·kTileBlocks normals) per normals_tile_avx2 call.
constexpr int kTileBlocks = 64;

struct Philox4 {
  uint32_t r[4];
};

AGM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *lo = a * b;
  *hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Random123 philox4x32 with 10 rounds; the key is bumped before every round but the first.
AGM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                             uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, &hi0, &lo0);
    mulhilo32(kPhiloxM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 out;
  out.r[0] = c0;
  out.r[1] = c1;
  out.r[2] = c2;
  out.r[3] = c3;
  return out;
}

AGM_HD float uint_to_uniform(uint32_t r) {
  // (r + 0.5) · 2^-32: two fp32 roundings exactly as rng.uint_to_uniform does them.
  const float rf = static_cast<float>(r);
  const float shifted = rf + 0.5f;
  return shifted * kTwoPowM32;
}

AGM_HD void box_muller(uint32_t ra, uint32_t rb, float* z0, float* z1) {
  const float u1 = uint_to_uniform(ra);
  const float u2 = uint_to_uniform(rb);
#if defined(__CUDA_ARCH__)
  // Precise logf/sincosf (this file must not be built with --use_fast_math).
  const float radius = sqrtf(__fmul_rn(-2.0f, logf(u1)));
  const float theta = __fmul_rn(kTwoPi, u2);
  float s, c;
  sincosf(theta, &s, &c);
  *z0 = __fmul_rn(radius, c);
  *z1 = __fmul_rn(radius, s);
#else
  const float radius = sqrtf(-2.0f * logf(u1));
  const float theta = kTwoPi * u2;
  *z0 = radius * cosf(theta);
  *z1 = radius * sinf(theta);
#endif
}

// The 4 standard normals of Philox block `block` of image `image_index` at `step` in `stream`:
// elements 4·block … 4·block+3 of that image's flattened noise.
AGM_HD void normal4(uint32_t block, uint32_t image_index, uint32_t step, uint32_t stream,
                    uint32_t k0, uint32_t k1, float z[4]) {
  const Philox4 p = philox4x32_10(block, image_index, step, stream, k0, k1);
  box_muller(p.r[0], p.r[1], &z[0], &z[1]);
  box_muller(p.r[2], p.r[3], &z[2], &z[3]);
}

// ------------------------------------------------------------------------ CPU tile (AVX2 + FMA)
//
// Why: per element, scalar Philox plus libm logf/sinf/cosf cost ~10 ns, more than torch.randn.
// normals_tile_avx2 draws a tile of blocks at once: Philox on 8 counters per AVX2 register, then
// Box–Muller as a plain loop over the words that the compiler vectorises, with polynomial log and
// sin/cos in place of libm calls. The Philox words and the uniforms equal normal4's bit for bit;
// the polynomials are within 0.82 ulp (log) and 1.55 ulp (sin, cos) of exact over every fp32
// input of the ranges used (libm: ~0.6), so the normals differ from normal4's and from
// agm_fast.rng's by a few ulp, as those two differ from each other.
// Call it only where cpu_has_avx2_fma(). Build with -fno-math-errno (setup.py does): otherwise
// sqrtf keeps a scalar errno branch and the Box–Muller loop is not vectorised.
#ifdef AGM_HAVE_AVX2_TILE

inline bool cpu_has_avx2_fma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

namespace tile {

// Every helper is inlined into normals_tile_avx2 and compiled for its target.
#define AGM_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

AGM_AVX2_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

AGM_AVX2_INLINE float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// mulhilo32 on 8 lanes. Written with intrinsics because compilers vectorise the 64-bit product
// of mulhilo32 as a widening multiply with many lane shuffles; vpmuludq gives the products of
// the even lanes, so the odd lanes are shifted down for a second one.
AGM_AVX2_INLINE void mulhilo32x8(__m256i m, __m256i a, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_mullo_epi32(a, m);
}

// philox4x32_10 for blocks first_block … first_block + 7 of one (image, step, stream).
AGM_AVX2_INLINE void philox4x32_10_x8(uint32_t first_block, uint32_t c1_all, uint32_t c2_all, uint32_t c3_all,
                                      uint32_t k0, uint32_t k1, __m256i r[4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_block)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(c1_all));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(c2_all));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(c3_all));
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    __m256i hi0, lo0, hi1, lo1;
    mulhilo32x8(m0, c0, &hi0, &lo0);
    mulhilo32x8(m1, c2, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
  }
  r[0] = c0;
  r[1] = c1;
  r[2] = c2;
  r[3] = c3;
}

// Below, selections are integer or bit operations on purpose: a branch on a float compare is not
// if-converted under the default -ftrapping-math, and the loop would stay scalar.

// Natural log of a positive normal float (u ∈ [2^-33, 1] here). Cephes logf: u = m·2^e with
// m ∈ [√½, √2), so log u = e·ln2 + log(1 + x), x = m − 1 (exact); ln2 is split in two parts so
// that e·ln2_hi is exact and the sum keeps ~1 ulp.
AGM_AVX2_INLINE float log_positive(float u) {
  const uint32_t b = bits_of(u);
  const uint32_t mantissa = b & 0x007fffffu;
  const uint32_t high = mantissa > 0x003504f3u ? 1u : 0u;  // 1.mantissa > √2 (0x3fb504f3)
  const float m = float_of(mantissa | (high ? 0x3f000000u : 0x3f800000u));  // 1.mantissa · 2^−high
  const int32_t e = static_cast<int32_t>(b >> 23) - 127 + static_cast<int32_t>(high);
  const float x = m - 1.0f;
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = fmaf(p, x, -1.1514610310e-1f);
  p = fmaf(p, x, 1.1676998740e-1f);
  p = fmaf(p, x, -1.2420140846e-1f);
  p = fmaf(p, x, 1.4249322787e-1f);
  p = fmaf(p, x, -1.6668057665e-1f);
  p = fmaf(p, x, 2.0000714765e-1f);
  p = fmaf(p, x, -2.4999993993e-1f);
  p = fmaf(p, x, 3.3333331174e-1f);
  const float fe = static_cast<float>(e);
  float y = p * x * z;
  y = fmaf(fe, -2.12194440e-4f, y);  // ln2 − 0.693359375
  y = fmaf(z, -0.5f, y);
  return fmaf(fe, 0.693359375f, x + y);
}

// sin and cos of θ ∈ [0, 2π]. θ = j·π/2 + r with j = round(θ·2/π) ≤ 4; r by Cody–Waite with
// π/2 in three parts (the first product is exact, so r keeps its relative accuracy near the
// zeros); Cephes polynomials on |r| ≤ π/4; the quadrant j mod 4 swaps and negates.
AGM_AVX2_INLINE void sincos_0_2pi(float theta, float* sin_out, float* cos_out) {
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer kept in the low bits
  const float t = fmaf(theta, 0x1.45f306p-1f, shifter);  // 2/π
  const uint32_t quadrant = bits_of(t);
  const float j = t - shifter;
  float r = fmaf(j, -0x1.921fb6p+0f, theta);  // π/2 = 0x1.921fb6p+0 − 0x1.777a5cp-25 − 0x1.ee59dap-50
  r = fmaf(j, 0x1.777a5cp-25f, r);
  r = fmaf(j, 0x1.ee59dap-50f, r);
  const float z = r * r;
  float ps = -1.9515295891e-4f;
  ps = fmaf(ps, z, 8.3321608736e-3f);
  ps = fmaf(ps, z, -1.6666654611e-1f);
  const float s = fmaf(ps * z, r, r);
  float pc = 2.443315711809948e-5f;
  pc = fmaf(pc, z, -1.388731625493765e-3f);
  pc = fmaf(pc, z, 4.166664568298827e-2f);
  const float c = fmaf(pc * z, z, fmaf(z, -0.5f, 1.0f));
  const uint32_t odd = quadrant & 1u;
  const uint32_t sin_r = bits_of(odd ? c : s);
  const uint32_t cos_r = bits_of(odd ? s : c);
  *sin_out = float_of(sin_r ^ ((quadrant & 2u) << 30));        // negative in quadrants 2, 3
  *cos_out = float_of(cos_r ^ (((quadrant + 1u) & 2u) << 30));  // negative in quadrants 1, 2
}

// box_muller() with the polynomials: radius = sqrt(−2·log u_a), θ = 2π·u_b, same fp32 roundings.
AGM_AVX2_INLINE void box_muller_poly(uint32_t ra, uint32_t rb, float* z0, float* z1) {
  const float radius = sqrtf(-2.0f * log_positive(uint_to_uniform(ra)));
  float s, c;
  sincos_0_2pi(kTwoPi * uint_to_uniform(rb), &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

#undef AGM_AVX2_INLINE
}  // namespace tile

// normal4() for blocks first_block … first_block + nblocks − 1 (nblocks ≤ kTileBlocks):
// z[4·j + i] is normal i of block first_block + j. Blocks are drawn 8 at a time, so z is written
// up to block round_up(nblocks, 8) − 1 and must have room for 4·kTileBlocks floats.
__attribute__((target("avx2,fma"))) inline void normals_tile_avx2(uint32_t first_block, int nblocks,
                                                                   uint32_t image_index, uint32_t step,
                                                                   uint32_t stream, uint32_t k0, uint32_t k1,
                                                                   float z[4 * kTileBlocks]) {
  alignas(32) uint32_t r[4][kTileBlocks];  // Philox word i of block j in r[i][j]
  const int nblocks8 = (nblocks + 7) & ~7;
  for (int j = 0; j < nblocks8; j += 8) {
    __m256i words[4];
    tile::philox4x32_10_x8(first_block + static_cast<uint32_t>(j), image_index, step, stream, k0, k1, words);
    for (int i = 0; i < 4; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(&r[i][j]), words[i]);
  }
  for (int j = 0; j < nblocks8; ++j) {
    tile::box_muller_poly(r[0][j], r[1][j], &z[4 * j], &z[4 * j + 1]);
    tile::box_muller_poly(r[2][j], r[3][j], &z[4 * j + 2], &z[4 * j + 3]);
  }
}
#endif

}  // namespace agm
