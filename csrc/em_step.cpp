// agm_fast._C: the fused Euler–Maruyama step of the sampler (docs/design.md §1 "sampling", §3).
//
//   em_step_(x, drift, image_index, step, dt, sigma, seed_lo, seed_hi)   x ← x + drift·dt + σ·sqrt(dt)·z
//       z from Philox in-op: key = (seed_lo, seed_hi), counter = (element // 4, image_index[b], step, EM),
//       i.e. exactly agm_fast.rng.normal(seed, step, image_index, numel, rng.Stream.EM).
//   em_step_z_(x, drift, z, dt, sigma)                                    same with z given (parity tests)
//   em_step_last_(x, drift, dt)                                           x ← x + drift·dt (last step, σ = 0)
//   _em_step_cpu_(x, drift, image_index, step, dt, sigma, seed_lo, seed_hi, noise)
//       em_step_ on the CPU with the noise generator named: "auto" (what em_step_ uses), "avx2" or
//       "scalar"; for tests, so that both generators are checked against agm_fast.rng.
//   _em_step_cuda_emulated_(...)   the CUDA kernel's body run on the CPU, for tests: em_step_emulation.cpp
//
// x: [B, ...] contiguous, fp32/bf16/fp16, updated in place. drift: x's shape, any of those dtypes
// (a bf16 network output may drive an fp32 state). Arithmetic is fp32, one rounding per operation
// in the reference's order: v = x + drift·dt; v = v + (σ·sqrt(dt))·z; x = round_to_storage(v).
// image_index: int64 [B] (global image indices, one Philox key per image, so results do not depend
// on batching); step: int64 tensor with one element. Both live on x's device and are read by the
// kernel, so a CUDA graph that advances `step` in device memory replays with fresh noise.
//
// This file owns the op schemas (TORCH_LIBRARY), the CPU kernels (at::parallel_for), the glue to
// the CUDA kernel in em_step_cuda.cu (torch-free) when built with AGM_WITH_CUDA, and the Python
// module agm_fast._C. The argument checks live in em_step_torch.h; fake kernels in agm_fast/ext.py.
// The module constant agm_fast._C.CPU_NOISE names the CPU noise generator in use ("avx2" or "scalar").

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "em_step_kernel.h"
#include "em_step_torch.h"
#include "philox.h"

#if defined(AGM_HAVE_AVX2_TILE) && !defined(__NO_MATH_ERRNO__)
#warning "agm_fast._C built without -fno-math-errno: the AVX2 noise tile will not vectorise sqrtf (slow)"
#endif

#ifdef AGM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
extern "C" int agm_em_step_cuda_launch(void* x, int x_dtype, const void* drift, int drift_dtype, const float* z,
                                       const int64_t* image_index, const int64_t* step, int64_t rows,
                                       int64_t row_numel, float dt, float noise_scale, uint32_t seed_lo,
                                       uint32_t seed_hi, int mode, void* stream);
extern "C" const char* agm_em_step_cuda_error_string(int code);
#endif

namespace {

using agm::kNoiseGiven;  // the modes of the CUDA entry point (em_step_kernel.h)
using agm::kNoiseInKernel;
using agm::kNoiseless;
// the argument checks and storage-type dispatch shared with the CUDA-body emulation (em_step_torch.h)
using agm::bump_version_of_x;
using agm::check_common;
using agm::check_noise_keys;
using agm::check_z;
using agm::noise_scale_of;
using agm::seed_word;
using agm::with_storage_type;

constexpr int64_t kTileBlocks = agm::kTileBlocks;  // Philox blocks per work item: ≤ 256 normals, then one update loop

// ------------------------------------------------------------------------------------------- CPU

// A CPU noise generator: the normals of Philox blocks first_block … first_block + nblocks − 1 of
// one image (stream EM) into z[0 … 4·kTileBlocks). The two below draw the same Philox words; their
// normals differ from each other and from agm_fast.rng by a few ulp (log/sin/cos).
using EmNoiseFn = void (*)(uint32_t first_block, int nblocks, uint32_t image, uint32_t step, uint32_t k0,
                           uint32_t k1, float* z);

void em_noise_scalar(uint32_t first_block, int nblocks, uint32_t image, uint32_t step, uint32_t k0, uint32_t k1,
                     float* z) {
  for (int j = 0; j < nblocks; ++j) {
    agm::normal4(first_block + static_cast<uint32_t>(j), image, step, agm::kStreamEM, k0, k1, &z[4 * j]);
  }
}

#ifdef AGM_HAVE_AVX2_TILE
void em_noise_avx2(uint32_t first_block, int nblocks, uint32_t image, uint32_t step, uint32_t k0, uint32_t k1,
                   float* z) {
  agm::normals_tile_avx2(first_block, nblocks, image, step, agm::kStreamEM, k0, k1, z);
}
#endif

bool cpu_has_avx2_noise() {
#ifdef AGM_HAVE_AVX2_TILE
  return agm::cpu_has_avx2_fma();
#else
  return false;
#endif
}

// "auto" (what em_step_ uses): the AVX2 generator where the CPU has it, else the scalar one.
EmNoiseFn em_noise_generator(const std::string& noise) {
  TORCH_CHECK(noise == "auto" || noise == "avx2" || noise == "scalar",
              "em_step: noise generator must be 'auto', 'avx2' or 'scalar', got '", noise, "'");
#ifdef AGM_HAVE_AVX2_TILE
  if (noise != "scalar" && cpu_has_avx2_noise()) return &em_noise_avx2;
#endif
  TORCH_CHECK(noise != "avx2", "em_step: the 'avx2' noise generator needs an x86-64 CPU with AVX2 and FMA");
  return &em_noise_scalar;
}

template <typename TX, typename TD>
void em_step_cpu_kernel(at::Tensor& x, const at::Tensor& drift_c, const float* z_given, EmNoiseFn normals,
                        const int64_t* image_index, uint32_t step, float dt, float noise_scale, uint32_t k0,
                        uint32_t k1, int mode) {
  TX* xp = x.data_ptr<TX>();
  const TD* dp = drift_c.data_ptr<TD>();
  const int64_t rows = x.size(0);
  const int64_t row_numel = x.numel() / rows;
  const int64_t blocks_per_row = (row_numel + 3) / 4;
  const int64_t tiles_per_row = (blocks_per_row + kTileBlocks - 1) / kTileBlocks;
  // Work item = one tile (≤ 256 elements of one image); grain keeps ≥ ~32k elements per task.
  at::parallel_for(0, rows * tiles_per_row, 128, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kTileBlocks * 4];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / tiles_per_row;
      const int64_t first_block = (item - row * tiles_per_row) * kTileBlocks;
      const int64_t start = first_block * 4;                                   // element offset in the row
      const int64_t count = std::min<int64_t>(kTileBlocks * 4, row_numel - start);
      const int64_t off = row * row_numel + start;
      if (mode == kNoiseInKernel) {
        normals(static_cast<uint32_t>(first_block), static_cast<int>((count + 3) / 4),
                static_cast<uint32_t>(image_index[row]), step, k0, k1, z);
      } else if (mode == kNoiseGiven) {
        for (int64_t i = 0; i < count; ++i) z[i] = z_given[off + i];
      }
      // The update: a flat fp32 loop over contiguous memory that the compiler vectorises.
      TX* xr = xp + off;
      const TD* dr = dp + off;
      if (mode == kNoiseless) {
        for (int64_t i = 0; i < count; ++i) {
          const float v = static_cast<float>(xr[i]) + static_cast<float>(dr[i]) * dt;
          xr[i] = static_cast<TX>(v);
        }
      } else {
        for (int64_t i = 0; i < count; ++i) {
          float v = static_cast<float>(xr[i]) + static_cast<float>(dr[i]) * dt;
          v = v + noise_scale * z[i];
          xr[i] = static_cast<TX>(v);
        }
      }
    }
  });
}

void em_step_cpu_dispatch(at::Tensor& x, const at::Tensor& drift, const float* z, EmNoiseFn normals,
                          const int64_t* image_index, uint32_t step, float dt, float noise_scale, uint32_t k0,
                          uint32_t k1, int mode) {
  const at::Tensor drift_c = drift.contiguous();
  with_storage_type(x.scalar_type(), [&](auto x_tag) {
    with_storage_type(drift_c.scalar_type(), [&](auto drift_tag) {
      em_step_cpu_kernel<decltype(x_tag), decltype(drift_tag)>(x, drift_c, z, normals, image_index, step, dt,
                                                               noise_scale, k0, k1, mode);
    });
  });
}

void em_step_cpu_with(at::Tensor x, const at::Tensor& drift, const at::Tensor& image_index, const at::Tensor& step,
                      double dt, double sigma, int64_t seed_lo, int64_t seed_hi, c10::string_view noise) {
  check_common(x, drift, dt);
  check_noise_keys(x, image_index, step);
  const EmNoiseFn normals = em_noise_generator(std::string(noise));
  const float ns = noise_scale_of(dt, sigma);
  const int64_t k = step.item<int64_t>();
  TORCH_CHECK_VALUE(k >= 0 && k <= 0xffffffffLL, "em_step: step must be in [0, 2**32), got ", k);
  const at::Tensor idx = image_index.contiguous();
  em_step_cpu_dispatch(x, drift, nullptr, normals, idx.data_ptr<int64_t>(), static_cast<uint32_t>(k),
                       static_cast<float>(dt), ns, seed_word(seed_lo, "seed_lo"), seed_word(seed_hi, "seed_hi"),
                       kNoiseInKernel);
}

void em_step_cpu(at::Tensor x, const at::Tensor& drift, const at::Tensor& image_index, const at::Tensor& step,
                 double dt, double sigma, int64_t seed_lo, int64_t seed_hi) {
  em_step_cpu_with(x, drift, image_index, step, dt, sigma, seed_lo, seed_hi, "auto");
}

void em_step_z_cpu(at::Tensor x, const at::Tensor& drift, const at::Tensor& z, double dt, double sigma) {
  check_common(x, drift, dt);
  check_z(x, z);
  const float ns = noise_scale_of(dt, sigma);
  const at::Tensor zf = z.to(at::kFloat).contiguous();
  em_step_cpu_dispatch(x, drift, zf.data_ptr<float>(), nullptr, nullptr, 0, static_cast<float>(dt), ns, 0, 0,
                       kNoiseGiven);
}

void em_step_last_cpu(at::Tensor x, const at::Tensor& drift, double dt) {
  check_common(x, drift, dt);
  em_step_cpu_dispatch(x, drift, nullptr, nullptr, nullptr, 0, static_cast<float>(dt), 0.f, 0, 0, kNoiseless);
}

// ------------------------------------------------------------------------------------------- CUDA

#ifdef AGM_WITH_CUDA
int dtype_code(at::ScalarType t) {
  return t == at::kFloat ? 0 : (t == at::kBFloat16 ? 1 : 2);
}

void launch_cuda(at::Tensor& x, const at::Tensor& drift, const float* z, const int64_t* index, const int64_t* step,
                 double dt, float ns, uint32_t k0, uint32_t k1, int mode) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor drift_c = drift.contiguous();
  const int64_t rows = x.size(0);
  const int err = agm_em_step_cuda_launch(x.data_ptr(), dtype_code(x.scalar_type()), drift_c.data_ptr(),
                                          dtype_code(drift_c.scalar_type()), z, index, step, rows, x.numel() / rows,
                                          static_cast<float>(dt), ns, k0, k1, mode,
                                          c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "em_step: CUDA kernel launch failed: ", agm_em_step_cuda_error_string(err));
}

void em_step_cuda(at::Tensor x, const at::Tensor& drift, const at::Tensor& image_index, const at::Tensor& step,
                  double dt, double sigma, int64_t seed_lo, int64_t seed_hi) {
  check_common(x, drift, dt);
  check_noise_keys(x, image_index, step);
  TORCH_CHECK(image_index.is_contiguous(), "em_step: image_index must be contiguous");
  // step is read by the kernel from device memory (no host sync, capturable in a CUDA graph)
  launch_cuda(x, drift, nullptr, image_index.data_ptr<int64_t>(), step.data_ptr<int64_t>(), dt,
              noise_scale_of(dt, sigma), seed_word(seed_lo, "seed_lo"), seed_word(seed_hi, "seed_hi"),
              kNoiseInKernel);
}

void em_step_z_cuda(at::Tensor x, const at::Tensor& drift, const at::Tensor& z, double dt, double sigma) {
  check_common(x, drift, dt);
  check_z(x, z);
  const at::Tensor zf = z.to(at::kFloat).contiguous();
  launch_cuda(x, drift, zf.data_ptr<float>(), nullptr, nullptr, dt, noise_scale_of(dt, sigma), 0, 0, kNoiseGiven);
}

void em_step_last_cuda(at::Tensor x, const at::Tensor& drift, double dt) {
  check_common(x, drift, dt);
  launch_cuda(x, drift, nullptr, nullptr, nullptr, dt, 0.f, 0, 0, kNoiseless);
}
#endif

}  // namespace

TORCH_LIBRARY(agm_fast, m) {
  m.def("em_step_(Tensor(a!) x, Tensor drift, Tensor image_index, Tensor step, float dt, float sigma, "
        "int seed_lo, int seed_hi) -> ()");
  m.def("em_step_z_(Tensor(a!) x, Tensor drift, Tensor z, float dt, float sigma) -> ()");
  m.def("em_step_last_(Tensor(a!) x, Tensor drift, float dt) -> ()");
  m.def("_em_step_cpu_(Tensor(a!) x, Tensor drift, Tensor image_index, Tensor step, float dt, float sigma, "
        "int seed_lo, int seed_hi, str noise) -> ()");
}

TORCH_LIBRARY_IMPL(agm_fast, CPU, m) {
  m.impl("em_step_", &em_step_cpu);
  m.impl("em_step_z_", &em_step_z_cpu);
  m.impl("em_step_last_", &em_step_last_cpu);
  m.impl("_em_step_cpu_", &em_step_cpu_with);
}

TORCH_LIBRARY_IMPL(agm_fast, ADInplaceOrView, m) {
  m.impl("em_step_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("em_step_z_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("em_step_last_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("_em_step_cpu_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
}

#ifdef AGM_WITH_CUDA
TORCH_LIBRARY_IMPL(agm_fast, CUDA, m) {
  m.impl("em_step_", &em_step_cuda);
  m.impl("em_step_z_", &em_step_z_cuda);
  m.impl("em_step_last_", &em_step_last_cuda);
}
#endif

// A plain Python module: importing agm_fast._C runs the registrations above. WITH_CUDA tells
// agm_fast.ext whether the CUDA kernels were compiled in.
static struct PyModuleDef agm_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", "agm_fast C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&agm_fast_c_module);
  if (module == nullptr) return nullptr;
#ifdef AGM_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  PyModule_AddStringConstant(module, "CPU_NOISE", cpu_has_avx2_noise() ? "avx2" : "scalar");
  return module;
}
