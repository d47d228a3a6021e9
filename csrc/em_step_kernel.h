// The per-thread body of the CUDA Euler–Maruyama kernel, written once for host and device.
//
// em_step_cuda.cu runs em_step_block on the GPU (one thread per Philox block, grid-stride). The
// CPU build compiles the same body too: agm_fast._C's test-only op `_em_step_cuda_emulated_`
// (em_step_emulation.cpp) calls it for every thread index in turn, so the CUDA kernel's indexing,
// tail handling, vector path, noise keys and roundings are checked against the PyTorch reference
// on a machine without a GPU (tests/test_em_op.py). Only the grid-stride loop and the launch stay
// GPU-only.
//
// The includer specialises agm::Storage<T> for its 16-bit types (cuda_bf16/cuda_fp16 types in
// the .cu, c10::BFloat16/c10::Half in em_step_torch.h): load(T) → float, store(float) → T with
// round-to-nearest-even. Torch-free, so nvcc compiles the .cu on its own.
#pragma once

#include <stdint.h>

#include "philox.h"

namespace agm {

enum EmMode : int { kNoiseInKernel = 0, kNoiseGiven = 1, kNoiseless = 2 };

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  static AGM_HD float load(float v) { return v; }
  static AGM_HD float store(float v) { return v; }
};

// fp32 add and multiply with one rounding each, never fused into an FMA: the reference computes
// v = x + drift·dt, then v + (σ·sqrt(dt))·z, rounding after every operation. (Host builds use
// -ffp-contract=off for the same reason.)
AGM_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

AGM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Whether the kernel may move 4 elements per operand as one vector access: every image's size
// is a multiple of 4 (so no Philox block straddles two images) and every pointer is aligned.
inline bool em_step_vector_ok(int64_t row_numel, const void* x, int x_bytes, const void* drift, int drift_bytes,
                              const float* z) {
  return row_numel % 4 == 0 && reinterpret_cast<uintptr_t>(x) % (4 * x_bytes) == 0 &&
         reinterpret_cast<uintptr_t>(drift) % (4 * drift_bytes) == 0 &&
         (z == nullptr || reinterpret_cast<uintptr_t>(z) % 16 == 0);
}

// Thread g of rows × blocks_per_row: elements 4·blk … 4·blk+3 of image `row` (fewer at the end
// of an image whose size is not a multiple of 4). x ← x + drift·dt (+ noise_scale·z), in place.
template <typename TX, typename TD, int MODE, bool VEC>
AGM_HD void em_step_block(int64_t g, TX* x, const TD* drift, const float* z_given, const int64_t* image_index,
                          uint32_t step, int64_t row_numel, int64_t blocks_per_row, float dt, float noise_scale,
                          uint32_t k0, uint32_t k1) {
  const int64_t row = g / blocks_per_row;
  const int64_t blk = g - row * blocks_per_row;
  const int64_t base = row * row_numel + blk * 4;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if (MODE == kNoiseInKernel) {
    normal4(static_cast<uint32_t>(blk), static_cast<uint32_t>(image_index[row]), step, kStreamEM, k0, k1, z);
  }
  if (VEC) {
    Pack4<TX> xv = *reinterpret_cast<const Pack4<TX>*>(x + base);
    const Pack4<TD> dv = *reinterpret_cast<const Pack4<TD>*>(drift + base);
    if (MODE == kNoiseGiven) {
      const Pack4<float> zv = *reinterpret_cast<const Pack4<float>*>(z_given + base);
      for (int i = 0; i < 4; ++i) z[i] = zv.v[i];
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < 4; ++i) {
      float v = add_rn(Storage<TX>::load(xv.v[i]), mul_rn(Storage<TD>::load(dv.v[i]), dt));
      if (MODE != kNoiseless) v = add_rn(v, mul_rn(noise_scale, z[i]));
      xv.v[i] = Storage<TX>::store(v);
    }
    *reinterpret_cast<Pack4<TX>*>(x + base) = xv;
  } else {
    const int64_t n = row_numel - blk * 4 < 4 ? row_numel - blk * 4 : 4;
    for (int i = 0; i < n; ++i) {
      float v = add_rn(Storage<TX>::load(x[base + i]), mul_rn(Storage<TD>::load(drift[base + i]), dt));
      if (MODE == kNoiseGiven) z[i] = z_given[base + i];
      if (MODE != kNoiseless) v = add_rn(v, mul_rn(noise_scale, z[i]));
      x[base + i] = Storage<TX>::store(v);
    }
  }
}

}  // namespace agm
