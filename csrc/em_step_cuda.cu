// CUDA kernel of the fused Euler–Maruyama step (DESIGN.md §1, §3), in place:
//     x ← x + drift·dt + noise_scale·z,   noise_scale = σ·sqrt(dt)
// with z drawn in-kernel from Philox (agm_fast.rng layout, stream EM, step word = EM step k),
// or read from a tensor (parity mode), or absent (noiseless last step / σ = 0).
//
// No torch headers: nvcc compiles this file on its own (csrc/nvcc_check.sh). The torch side
// (checks, dtype codes, current stream) lives in em_step.cpp behind AGM_WITH_CUDA.
//
// One thread handles one Philox block = 4 consecutive elements of one image (every output of
// every draw is used); grid-stride over all blocks of the batch. When an image's size is a
// multiple of 4 and the pointers are aligned, the 4 elements move as one vector load/store.
// The step k and the image indices are read from device memory, so a captured CUDA graph
// replays with whatever step the graph itself wrote there (no baked-in counters).
// Arithmetic is fp32 with explicit round-to-nearest (no FMA contraction), matching the
// PyTorch reference operation by operation.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "philox.h"

namespace {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Mode : int { kNoiseInKernel = 0, kNoiseGiven = 1, kNoiseless = 2 };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename TX, typename TD, int MODE, bool VEC>
__global__ void __launch_bounds__(256)
em_step_kernel(TX* __restrict__ x, const TD* __restrict__ drift, const float* __restrict__ z_given,
               const int64_t* __restrict__ image_index, const int64_t* __restrict__ step_ptr,
               int64_t rows, int64_t row_numel, float dt, float noise_scale, uint32_t k0, uint32_t k1) {
  const int64_t blocks_per_row = (row_numel + 3) / 4;
  const int64_t total = rows * blocks_per_row;
  uint32_t step = 0;
  if (MODE == kNoiseInKernel) step = static_cast<uint32_t>(*step_ptr);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = g / blocks_per_row;
    const int64_t blk = g - row * blocks_per_row;
    const int64_t base = row * row_numel + blk * 4;
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (MODE == kNoiseInKernel) {
      agm::normal4(static_cast<uint32_t>(blk), static_cast<uint32_t>(image_index[row]), step,
                   agm::kStreamEM, k0, k1, z);
    }
    if (VEC) {  // row_numel % 4 == 0 and aligned pointers: one vector access per operand
      Pack4<TX> xv = *reinterpret_cast<const Pack4<TX>*>(x + base);
      const Pack4<TD> dv = *reinterpret_cast<const Pack4<TD>*>(drift + base);
      if (MODE == kNoiseGiven) {
        const float4 zv = *reinterpret_cast<const float4*>(z_given + base);
        z[0] = zv.x; z[1] = zv.y; z[2] = zv.z; z[3] = zv.w;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = __fadd_rn(to_f32(xv.v[i]), __fmul_rn(to_f32(dv.v[i]), dt));
        if (MODE != kNoiseless) v = __fadd_rn(v, __fmul_rn(noise_scale, z[i]));
        xv.v[i] = from_f32<TX>(v);
      }
      *reinterpret_cast<Pack4<TX>*>(x + base) = xv;
    } else {
      const int64_t n = row_numel - blk * 4 < 4 ? row_numel - blk * 4 : 4;
      for (int i = 0; i < n; ++i) {
        float v = __fadd_rn(to_f32(x[base + i]), __fmul_rn(to_f32(drift[base + i]), dt));
        if (MODE == kNoiseGiven) z[i] = z_given[base + i];
        if (MODE != kNoiseless) v = __fadd_rn(v, __fmul_rn(noise_scale, z[i]));
        x[base + i] = from_f32<TX>(v);
      }
    }
  }
}

template <typename TX, typename TD, int MODE>
cudaError_t launch_typed(void* x, const void* drift, const float* z, const int64_t* index, const int64_t* step,
                         int64_t rows, int64_t row_numel, float dt, float noise_scale, uint32_t k0, uint32_t k1,
                         cudaStream_t stream) {
  const int64_t total = rows * ((row_numel + 3) / 4);
  if (total == 0) return cudaSuccess;
  int device = 0, sms = 1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int threads = 256;
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  const int64_t wanted = (total + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 16;
  const unsigned grid = static_cast<unsigned>(wanted < cap ? wanted : cap);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % (4 * sizeof(TX)) == 0) &&
                       (reinterpret_cast<uintptr_t>(drift) % (4 * sizeof(TD)) == 0) &&
                       (z == nullptr || reinterpret_cast<uintptr_t>(z) % 16 == 0);
  TX* xp = static_cast<TX*>(x);
  const TD* dp = static_cast<const TD*>(drift);
  if (row_numel % 4 == 0 && aligned) {
    em_step_kernel<TX, TD, MODE, true><<<grid, threads, 0, stream>>>(xp, dp, z, index, step, rows, row_numel,
                                                                     dt, noise_scale, k0, k1);
  } else {
    em_step_kernel<TX, TD, MODE, false><<<grid, threads, 0, stream>>>(xp, dp, z, index, step, rows, row_numel,
                                                                      dt, noise_scale, k0, k1);
  }
  return cudaGetLastError();
}

template <typename TX, typename TD>
cudaError_t launch_mode(int mode, void* x, const void* drift, const float* z, const int64_t* index,
                        const int64_t* step, int64_t rows, int64_t row_numel, float dt, float noise_scale,
                        uint32_t k0, uint32_t k1, cudaStream_t stream) {
  switch (mode) {
    case kNoiseInKernel:
      return launch_typed<TX, TD, kNoiseInKernel>(x, drift, z, index, step, rows, row_numel, dt, noise_scale, k0, k1, stream);
    case kNoiseGiven:
      return launch_typed<TX, TD, kNoiseGiven>(x, drift, z, index, step, rows, row_numel, dt, noise_scale, k0, k1, stream);
    case kNoiseless:
      return launch_typed<TX, TD, kNoiseless>(x, drift, z, index, step, rows, row_numel, dt, noise_scale, k0, k1, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename TX>
cudaError_t launch_drift(int drift_dtype, int mode, void* x, const void* drift, const float* z, const int64_t* index,
                         const int64_t* step, int64_t rows, int64_t row_numel, float dt, float noise_scale,
                         uint32_t k0, uint32_t k1, cudaStream_t stream) {
  switch (drift_dtype) {
    case kF32:
      return launch_mode<TX, float>(mode, x, drift, z, index, step, rows, row_numel, dt, noise_scale, k0, k1, stream);
    case kBF16:
      return launch_mode<TX, __nv_bfloat16>(mode, x, drift, z, index, step, rows, row_numel, dt, noise_scale, k0, k1, stream);
    case kF16:
      return launch_mode<TX, __half>(mode, x, drift, z, index, step, rows, row_numel, dt, noise_scale, k0, k1, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

// Plain C entry point (no torch types). dtype codes: 0 = fp32, 1 = bf16, 2 = fp16.
// mode: 0 = in-kernel Philox noise (needs index [rows] and step [1], int64, device memory),
//       1 = noise read from z (fp32, same layout as x), 2 = noiseless (x ← x + drift·dt).
// x and drift are contiguous [rows, row_numel]. Returns the CUDA error of the launch.
extern "C" int agm_em_step_cuda_launch(void* x, int x_dtype, const void* drift, int drift_dtype, const float* z,
                                       const int64_t* image_index, const int64_t* step, int64_t rows,
                                       int64_t row_numel, float dt, float noise_scale, uint32_t seed_lo,
                                       uint32_t seed_hi, int mode, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case kF32:
      return launch_drift<float>(drift_dtype, mode, x, drift, z, image_index, step, rows, row_numel, dt, noise_scale,
                                 seed_lo, seed_hi, s);
    case kBF16:
      return launch_drift<__nv_bfloat16>(drift_dtype, mode, x, drift, z, image_index, step, rows, row_numel, dt,
                                         noise_scale, seed_lo, seed_hi, s);
    case kF16:
      return launch_drift<__half>(drift_dtype, mode, x, drift, z, image_index, step, rows, row_numel, dt, noise_scale,
                                  seed_lo, seed_hi, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Error text for a code returned above (so the C++ glue needs no CUDA runtime header).
extern "C" const char* agm_em_step_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
