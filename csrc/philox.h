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
#pragma once

#include <stdint.h>
#include <math.h>

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

}  // namespace agm
