// agm_fast._C: the fused Euler–Maruyama step of the sampler (DESIGN.md §1 "sampling", §3).
//
//   em_step_(x, drift, image_index, step, dt, sigma, seed_lo, seed_hi)   x ← x + drift·dt + σ·sqrt(dt)·z
//       z from Philox in-op: key = (seed_lo, seed_hi), counter = (element // 4, image_index[b], step, EM),
//       i.e. exactly agm_fast.rng.normal(seed, step, image_index, numel, rng.Stream.EM).
//   em_step_z_(x, drift, z, dt, sigma)                                    same with z given (parity tests)
//   em_step_last_(x, drift, dt)                                           x ← x + drift·dt (last step, σ = 0)
//   _em_step_cpu_(x, drift, image_index, step, dt, sigma, seed_lo, seed_hi, noise)
//       em_step_ on the CPU with the noise generator named: "auto" (what em_step_ uses), "avx2" or
//       "scalar"; for tests, so that both generators are checked against agm_fast.rng.
//   _em_step_cuda_emulated_(x, drift, z?, image_index, step, dt, sigma, seed_lo, seed_hi, mode) -> bool
//       the CUDA kernel's per-thread body (em_step_kernel.h) run on the CPU for every thread index,
//       with the CUDA launcher's choice of vector path (returned); for tests on machines without a GPU.
//
// x: [B, ...] contiguous, fp32/bf16/fp16, updated in place. drift: x's shape, any of those dtypes
// (a bf16 network output may drive an fp32 state). Arithmetic is fp32, one rounding per operation
// in the reference's order: v = x + drift·dt; v = v + (σ·sqrt(dt))·z; x = round_to_storage(v).
// image_index: int64 [B] (global image indices, one Philox key per image, so results do not depend
// on batching); step: int64 tensor with one element. Both live on x's device and are read by the
// kernel, so a CUDA graph that advances `step` in device memory replays with fresh noise.
//
// CPU kernel here (at::parallel_for); CUDA kernel in em_step_cuda.cu (torch-free), glued below
// when built with AGM_WITH_CUDA. Registered with torch.library; fake kernels are in agm_fast/ext.py.
// The module constant agm_fast._C.CPU_NOISE names the CPU noise generator in use ("avx2" or "scalar").

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "em_step_kernel.h"
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

constexpr int64_t kTileBlocks = agm::kTileBlocks;  // Philox blocks per work item: ≤ 256 normals, then one update loop

bool is_float_storage(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks shared by every variant; messages name the argument and what is allowed.
void check_common(const at::Tensor& x, const at::Tensor& drift, double dt) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, "em_step: x must be [B, ...] with B >= 1, got shape ", x.sizes());
  TORCH_CHECK(is_float_storage(x.scalar_type()), "em_step: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(is_float_storage(drift.scalar_type()), "em_step: drift must be float32, bfloat16 or float16, got ",
              drift.scalar_type());
  TORCH_CHECK(drift.sizes() == x.sizes(), "em_step: drift shape ", drift.sizes(), " must equal x shape ", x.sizes());
  TORCH_CHECK(drift.device() == x.device(), "em_step: drift is on ", drift.device(), " but x is on ", x.device());
  TORCH_CHECK(x.is_contiguous(), "em_step: x is updated in place and must be contiguous "
              "(agm_fast.ext.em_step_ handles non-contiguous x through a contiguous copy)");
  TORCH_CHECK(std::isfinite(dt) && dt > 0.0, "em_step: dt must be a finite positive float, got ", dt);
}

void check_noise_keys(const at::Tensor& x, const at::Tensor& image_index, const at::Tensor& step) {
  TORCH_CHECK(image_index.scalar_type() == at::kLong && image_index.dim() == 1 && image_index.size(0) == x.size(0),
              "em_step: image_index must be an int64 tensor of shape [B] = [", x.size(0), "], got ",
              image_index.scalar_type(), " ", image_index.sizes());
  TORCH_CHECK(step.scalar_type() == at::kLong && step.numel() == 1,
              "em_step: step must be an int64 tensor with one element, got ", step.scalar_type(), " ", step.sizes());
  TORCH_CHECK(image_index.device() == x.device() && step.device() == x.device(),
              "em_step: image_index and step must be on x's device ", x.device());
}

float noise_scale_of(double dt, double sigma) {
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0.0, "em_step: sigma must be a finite float >= 0, got ", sigma);
  // computed in double then rounded once, as the Python reference does (sigma * math.sqrt(dt))
  return static_cast<float>(sigma * std::sqrt(dt));
}

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

// f(T{}) for the storage type T of t (fp32, bf16 or fp16; check_common has rejected the others).
template <typename F>
void with_storage_type(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) {
    f(c10::BFloat16());
  } else if (t == at::kHalf) {
    f(c10::Half());
  } else {
    f(float());
  }
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

uint32_t seed_word(int64_t w, const char* name) {
  TORCH_CHECK(w >= 0 && w <= 0xffffffffLL, "em_step: ", name, " must be in [0, 2**32), got ", w);
  return static_cast<uint32_t>(w);
}

void em_step_cpu_with(at::Tensor x, const at::Tensor& drift, const at::Tensor& image_index, const at::Tensor& step,
                      double dt, double sigma, int64_t seed_lo, int64_t seed_hi, c10::string_view noise) {
  check_common(x, drift, dt);
  check_noise_keys(x, image_index, step);
  const EmNoiseFn normals = em_noise_generator(std::string(noise));
  const float ns = noise_scale_of(dt, sigma);
  const int64_t k = step.item<int64_t>();
  TORCH_CHECK(k >= 0 && k <= 0xffffffffLL, "em_step: step must be in [0, 2**32), got ", k);
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
  TORCH_CHECK(z.sizes() == x.sizes() && z.device() == x.device(), "em_step_z: z must have x's shape ", x.sizes(),
              " and device, got ", z.sizes(), " on ", z.device());
  const float ns = noise_scale_of(dt, sigma);
  const at::Tensor zf = z.to(at::kFloat).contiguous();
  em_step_cpu_dispatch(x, drift, zf.data_ptr<float>(), nullptr, nullptr, 0, static_cast<float>(dt), ns, 0, 0,
                       kNoiseGiven);
}

void em_step_last_cpu(at::Tensor x, const at::Tensor& drift, double dt) {
  check_common(x, drift, dt);
  em_step_cpu_dispatch(x, drift, nullptr, nullptr, nullptr, 0, static_cast<float>(dt), 0.f, 0, 0, kNoiseless);
}

// ------------------------------------------------------------------------------- CUDA body on CPU

}  // namespace

namespace agm {
template <>
struct Storage<c10::BFloat16> {
  static float load(c10::BFloat16 v) { return static_cast<float>(v); }
  static c10::BFloat16 store(float v) { return c10::BFloat16(v); }  // round to nearest even
};
template <>
struct Storage<c10::Half> {
  static float load(c10::Half v) { return static_cast<float>(v); }
  static c10::Half store(float v) { return c10::Half(v); }
};
}  // namespace agm

namespace {

// Every thread index of the CUDA grid in turn (the kernel has no shared memory or barriers, so
// running its threads one after another gives what the GPU gives), with the launcher's vector choice.
template <typename TX, typename TD, int MODE>
bool emulate_cuda_kernel(TX* x, const TD* drift, const float* z, const int64_t* image_index, uint32_t step,
                         int64_t rows, int64_t row_numel, float dt, float noise_scale, uint32_t k0, uint32_t k1) {
  const int64_t blocks_per_row = (row_numel + 3) / 4;
  const bool vec = agm::em_step_vector_ok(row_numel, x, sizeof(TX), drift, sizeof(TD), z);
  for (int64_t g = 0; g < rows * blocks_per_row; ++g) {
    if (vec) {
      agm::em_step_block<TX, TD, MODE, true>(g, x, drift, z, image_index, step, row_numel, blocks_per_row, dt,
                                             noise_scale, k0, k1);
    } else {
      agm::em_step_block<TX, TD, MODE, false>(g, x, drift, z, image_index, step, row_numel, blocks_per_row, dt,
                                              noise_scale, k0, k1);
    }
  }
  return vec;
}

bool em_step_cuda_emulated(at::Tensor x, const at::Tensor& drift, const c10::optional<at::Tensor>& z,
                           const at::Tensor& image_index, const at::Tensor& step, double dt, double sigma,
                           int64_t seed_lo, int64_t seed_hi, int64_t mode) {
  check_common(x, drift, dt);
  TORCH_CHECK(mode == kNoiseInKernel || mode == kNoiseGiven || mode == kNoiseless,
              "_em_step_cuda_emulated_: mode must be 0 (noise in kernel), 1 (z given) or 2 (noiseless), got ", mode);
  check_noise_keys(x, image_index, step);
  TORCH_CHECK(mode != kNoiseGiven || (z.has_value() && z->sizes() == x.sizes()),
              "_em_step_cuda_emulated_: mode 1 needs z of x's shape");
  // the same argument preparation as the CUDA glue below
  const at::Tensor drift_c = drift.contiguous();
  const at::Tensor zf = mode == kNoiseGiven ? z->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor idx = image_index.contiguous();
  const int64_t k = step.item<int64_t>();
  const float ns = mode == kNoiseless ? 0.f : noise_scale_of(dt, sigma);
  const uint32_t k0 = seed_word(seed_lo, "seed_lo"), k1 = seed_word(seed_hi, "seed_hi");
  const int64_t rows = x.size(0), row_numel = x.numel() / rows;
  const float* zp = zf.defined() ? zf.data_ptr<float>() : nullptr;
  bool vec = false;
  with_storage_type(x.scalar_type(), [&](auto x_tag) {
    using TX = decltype(x_tag);
    with_storage_type(drift_c.scalar_type(), [&](auto drift_tag) {
      using TD = decltype(drift_tag);
      TX* xp = x.data_ptr<TX>();
      const TD* dp = drift_c.data_ptr<TD>();
      const int64_t* ip = idx.data_ptr<int64_t>();
      const uint32_t st = static_cast<uint32_t>(k);
      if (mode == kNoiseInKernel) {
        vec = emulate_cuda_kernel<TX, TD, kNoiseInKernel>(xp, dp, zp, ip, st, rows, row_numel, dt, ns, k0, k1);
      } else if (mode == kNoiseGiven) {
        vec = emulate_cuda_kernel<TX, TD, kNoiseGiven>(xp, dp, zp, ip, st, rows, row_numel, dt, ns, k0, k1);
      } else {
        vec = emulate_cuda_kernel<TX, TD, kNoiseless>(xp, dp, zp, ip, st, rows, row_numel, dt, ns, k0, k1);
      }
    });
  });
  return vec;
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
  TORCH_CHECK(z.sizes() == x.sizes() && z.device() == x.device(), "em_step_z: z must have x's shape ", x.sizes(),
              " and device, got ", z.sizes(), " on ", z.device());
  const at::Tensor zf = z.to(at::kFloat).contiguous();
  launch_cuda(x, drift, zf.data_ptr<float>(), nullptr, nullptr, dt, noise_scale_of(dt, sigma), 0, 0, kNoiseGiven);
}

void em_step_last_cuda(at::Tensor x, const at::Tensor& drift, double dt) {
  check_common(x, drift, dt);
  launch_cuda(x, drift, nullptr, nullptr, nullptr, dt, 0.f, 0, 0, kNoiseless);
}
#endif

// ADInplaceOrView kernel shared by the three ops: run the op below this key, then bump x's version
// counter, as every built-in in-place op does (autograd then refuses stale saved tensors).
void bump_version_of_x(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::Tensor x = (*stack)[0].toTensor();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.callBoxed(stack);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY(agm_fast, m) {
  m.def("em_step_(Tensor(a!) x, Tensor drift, Tensor image_index, Tensor step, float dt, float sigma, "
        "int seed_lo, int seed_hi) -> ()");
  m.def("em_step_z_(Tensor(a!) x, Tensor drift, Tensor z, float dt, float sigma) -> ()");
  m.def("em_step_last_(Tensor(a!) x, Tensor drift, float dt) -> ()");
  m.def("_em_step_cpu_(Tensor(a!) x, Tensor drift, Tensor image_index, Tensor step, float dt, float sigma, "
        "int seed_lo, int seed_hi, str noise) -> ()");
  m.def("_em_step_cuda_emulated_(Tensor(a!) x, Tensor drift, Tensor? z, Tensor image_index, Tensor step, float dt, "
        "float sigma, int seed_lo, int seed_hi, int mode) -> bool");
}

TORCH_LIBRARY_IMPL(agm_fast, CPU, m) {
  m.impl("em_step_", &em_step_cpu);
  m.impl("em_step_z_", &em_step_z_cpu);
  m.impl("em_step_last_", &em_step_last_cpu);
  m.impl("_em_step_cpu_", &em_step_cpu_with);
  m.impl("_em_step_cuda_emulated_", &em_step_cuda_emulated);
}

TORCH_LIBRARY_IMPL(agm_fast, ADInplaceOrView, m) {
  m.impl("em_step_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("em_step_z_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("em_step_last_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("_em_step_cpu_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
  m.impl("_em_step_cuda_emulated_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_x>());
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
