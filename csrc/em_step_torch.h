// The torch side shared by the Euler–Maruyama op (em_step.cpp) and its test-only CUDA-body
// emulation (em_step_emulation.cpp): the argument checks of the raw ops, the storage-type
// dispatch, agm::Storage for torch's 16-bit types, and the version bump of the in-place ops.
//
// The checks are the ops' public edge (torch.ops.agm_fast.* is callable directly): a bad dtype
// (or a step that is not one int64) raises TypeError, a bad shape, device or value ValueError, a
// non-contiguous x RuntimeError, each naming the argument. agm_fast/ext.py adds only what Python knows (ints for seed, step and
// image indices, the contiguous copy) and lets these speak for the tensors.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "em_step_kernel.h"

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

inline bool is_float_storage(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks shared by every variant; messages name the argument and what is allowed.
inline void check_common(const at::Tensor& x, const at::Tensor& drift, double dt) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) >= 1, "em_step: x must be [B, ...] with B >= 1, got shape ",
                    x.sizes());
  TORCH_CHECK_TYPE(is_float_storage(x.scalar_type()), "em_step: x must be float32, bfloat16 or float16, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(is_float_storage(drift.scalar_type()),
                   "em_step: drift must be float32, bfloat16 or float16, got ", drift.scalar_type());
  TORCH_CHECK_VALUE(drift.sizes() == x.sizes(), "em_step: drift shape ", drift.sizes(), " must equal x shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(drift.device() == x.device(), "em_step: drift is on ", drift.device(), " but x is on ",
                    x.device());
  TORCH_CHECK(x.is_contiguous(), "em_step: x is updated in place and must be contiguous "
              "(agm_fast.ext.em_step_ handles non-contiguous x through a contiguous copy)");
  TORCH_CHECK_VALUE(std::isfinite(dt) && dt > 0.0, "em_step: dt must be a finite positive float, got ", dt);
}

inline void check_noise_keys(const at::Tensor& x, const at::Tensor& image_index, const at::Tensor& step) {
  TORCH_CHECK_VALUE(image_index.scalar_type() == at::kLong && image_index.dim() == 1 &&
                        image_index.size(0) == x.size(0),
                    "em_step: image_index must be an int64 tensor of shape [B] = [", x.size(0), "], got ",
                    image_index.scalar_type(), " ", image_index.sizes());
  TORCH_CHECK_TYPE(step.scalar_type() == at::kLong && step.numel() == 1,
                   "em_step: step must be an int64 tensor with one element, got ", step.scalar_type(), " ",
                   step.sizes());
  TORCH_CHECK_VALUE(image_index.device() == x.device() && step.device() == x.device(),
                    "em_step: image_index and step must be on x's device ", x.device());
}

inline void check_z(const at::Tensor& x, const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.sizes() == x.sizes() && z.device() == x.device(), "em_step_z: z must be a tensor of x's shape ",
                    x.sizes(), " on x's device ", x.device(), ", got ", z.sizes(), " on ", z.device());
}

inline float noise_scale_of(double dt, double sigma) {
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma >= 0.0, "em_step: sigma must be a finite float >= 0, got ",
                    sigma);
  // computed in double then rounded once, as the Python reference does (sigma * math.sqrt(dt))
  return static_cast<float>(sigma * std::sqrt(dt));
}

inline uint32_t seed_word(int64_t w, const char* name) {
  TORCH_CHECK_VALUE(w >= 0 && w <= 0xffffffffLL, "em_step: ", name, " must be in [0, 2**32), got ", w);
  return static_cast<uint32_t>(w);
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

// ADInplaceOrView kernel of every op here: run the op below this key, then bump x's version
// counter, as every built-in in-place op does (autograd then refuses stale saved tensors).
inline void bump_version_of_x(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::Tensor x = (*stack)[0].toTensor();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.callBoxed(stack);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

}  // namespace agm
