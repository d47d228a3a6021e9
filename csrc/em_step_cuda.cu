// CUDA kernel of the fused Euler–Maruyama step (docs/design.md §1, §3), in place:
//     x ← x + drift·dt + noise_scale·z,   noise_scale = σ·sqrt(dt)
// with z drawn in-kernel from Philox (agm_fast.rng layout, stream EM, step word = EM step k),
// or read from a tensor (parity mode), or absent (noiseless last step / σ = 0).
//
// No torch headers: nvcc compiles this file on its own (csrc/nvcc_check.sh). The torch side
// lives in em_step.cpp behind AGM_WITH_CUDA (dtype codes, current stream) and em_step_torch.h
// (argument checks).
//
// One thread handles one Philox block = 4 consecutive elements of one image (every output of
// every draw is used); grid-stride over all blocks of the batch. The per-thread body lives in
// em_step_kernel.h, which the CPU build also compiles, so tests run it without a GPU. When an image's size is a
// multiple of 4 and the pointers are aligned, the 4 elements move as one vector load/store.
// The step k and the image indices are read from device memory, so a captured CUDA graph
// replays with whatever step the graph itself wrote there (no baked-in counters).
// Arithmetic is fp32 with explicit round-to-nearest (no FMA contraction), matching the
// PyTorch reference operation by operation.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "em_step_kernel.h"

namespace agm {
template <>
struct Storage<__nv_bfloat16> {
  static __host__ __device__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __host__ __device__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Storage<__half> {
  static __host__ __device__ float load(__half v) { return __half2float(v); }
  static __host__ __device__ __half store(float v) { return __float2half_rn(v); }
};
}  // namespace agm

namespace {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
using agm::kNoiseInKernel;
using agm::kNoiseGiven;
using agm::kNoiseless;

template <typename TX, typename TD, int MODE, bool VEC>
__global__ void __launch_bounds__(256)
em_step_kernel(TX* __restrict__ x, const TD* __restrict__ drift, const float* __restrict__ z_given,
               const int64_t* __restrict__ image_index, const int64_t* __restrict__ step_ptr,
               int64_t rows, int64_t row_numel, float dt, float noise_scale, uint32_t k0, uint32_t k1) {
  const int64_t blocks_per_row = (row_numel + 3) / 4;
  const int64_t total = rows * blocks_per_row;
  const uint32_t step = MODE == kNoiseInKernel ? static_cast<uint32_t>(*step_ptr) : 0u;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    agm::em_step_block<TX, TD, MODE, VEC>(g, x, drift, z_given, image_index, step, row_numel, blocks_per_row, dt,
                                          noise_scale, k0, k1);
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
  TX* xp = static_cast<TX*>(x);
  const TD* dp = static_cast<const TD*>(drift);
  if (agm::em_step_vector_ok(row_numel, x, sizeof(TX), drift, sizeof(TD), z)) {
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
