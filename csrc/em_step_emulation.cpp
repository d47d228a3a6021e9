// agm_fast._C, test-only: the CUDA Euler–Maruyama kernel's per-thread body run on the CPU.
//
//   _em_step_cuda_emulated_(x, drift, z?, image_index, step, dt, sigma, seed_lo, seed_hi, mode) -> bool
//       the CUDA kernel's per-thread body (em_step_kernel.h) run on the CPU for every thread index,
//       with the CUDA launcher's choice of vector path (returned); mode 0 = noise in kernel, 1 = z
//       given, 2 = noiseless. For tests on machines without a GPU (tests/test_em_op.py): the CUDA
//       kernel's indexing, tails, vector path, noise keys and roundings are checked against the
//       fused CPU op and agm_fast.rng.
//
// This file owns that op (its schema, as a fragment of the agm_fast library that em_step.cpp
// defines, and its CPU kernel). It shares the argument checks, the storage-type dispatch and the
// version bump with the real op through em_step_torch.h.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "em_step_kernel.h"
#include "em_step_torch.h"

namespace {

using agm::check_common;
using agm::check_noise_keys;
using agm::check_z;
using agm::kNoiseGiven;
using agm::kNoiseInKernel;
using agm::kNoiseless;
using agm::noise_scale_of;
using agm::seed_word;
using agm::with_storage_type;

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
  TORCH_CHECK_VALUE(mode == kNoiseInKernel || mode == kNoiseGiven || mode == kNoiseless,
                    "_em_step_cuda_emulated_: mode must be 0 (noise in kernel), 1 (z given) or 2 (noiseless), got ",
                    mode);
  check_noise_keys(x, image_index, step);
  TORCH_CHECK_VALUE(mode != kNoiseGiven || z.has_value(), "_em_step_cuda_emulated_: mode 1 needs z");
  if (mode == kNoiseGiven) check_z(x, *z);
  // the same argument preparation as the CUDA glue in em_step.cpp
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(agm_fast, m) {
  m.def("_em_step_cuda_emulated_(Tensor(a!) x, Tensor drift, Tensor? z, Tensor image_index, Tensor step, float dt, "
        "float sigma, int seed_lo, int seed_hi, int mode) -> bool");
}

TORCH_LIBRARY_IMPL(agm_fast, CPU, m) {
  m.impl("_em_step_cuda_emulated_", &em_step_cuda_emulated);
}

TORCH_LIBRARY_IMPL(agm_fast, ADInplaceOrView, m) {
  m.impl("_em_step_cuda_emulated_", torch::CppFunction::makeFromBoxedFunction<&agm::bump_version_of_x>());
}
