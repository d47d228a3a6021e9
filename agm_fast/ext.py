"""The compiled extension agm_fast._C: the fused Euler–Maruyama op (docs/design.md §1 "sampling", §3).

This is the only module that imports agm_fast._C, and it owns the Python face of its ops:
whether they can run, their fake kernels, and the wrappers below. Importing it never fails:
`available()` says whether the op can run and why not. The ops are torch.library custom
operators (schemas and CPU/CUDA kernels in csrc/em_step.cpp) with fake kernels registered here,
so they trace under torch.compile and are captured by CUDA graphs (they read `step` and
`image_index` from device memory and never synchronise). The wrappers check what only Python
sees (seed, σ, an int step, the image indices: agm_fast.checks) and leave the tensors (dtypes,
shapes, devices, dt) to the op's own checks (csrc/em_step_torch.h), which raise TypeError or
ValueError naming the argument.

    em_step_(x, drift, *, dt, sigma, seed, step, image_index)   x ← x + drift·dt + σ·sqrt(dt)·z
        z = agm_fast.rng.normal(seed, step, image_index, x[0].numel(), rng.Stream.EM), drawn in-op
    em_step_z_(x, drift, z, *, dt, sigma)                       same with z given (parity tests)
    em_step_last_(x, drift, *, dt)                              x ← x + drift·dt (noiseless last step)

Image indices (the Philox key of each row, so noise does not depend on batching): either an int
b0, meaning rows b get global indices b0 + b, or B global indices (best an int64 tensor [B] on
x's device, used as is; other integer tensors and sequences are converted and moved there). The step: an int, or an int64 one-element tensor on x's device (what a CUDA graph
advances). x is updated in place and returned; fp32/bf16/fp16 storage, fp32 arithmetic.
"""

from __future__ import annotations

import torch

from . import checks, rng

_C = None
_IMPORT_ERROR: str | None = None
try:
    from agm_fast import _C  # noqa: F401  (registers torch.ops.agm_fast.*)
except Exception as err:  # missing or broken build: the package must still import
    _IMPORT_ERROR = f"agm_fast._C is not built or failed to load ({type(err).__name__}: {err}); " \
                    "rebuild with: pip install --no-build-isolation -e ."

def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(can the op run [on device], reason). device=None asks only whether the CPU op loaded."""
    if _C is None:
        return False, _IMPORT_ERROR or "agm_fast._C is not built"
    built_cuda = bool(getattr(_C, "WITH_CUDA", 0))
    kinds = "CPU + CUDA" if built_cuda else "CPU only"
    if device is None:
        return True, f"agm_fast._C loaded ({kinds})"
    device = torch.device(device)
    if device.type == "cpu":
        return True, f"agm_fast._C C++ op ({kinds}; CPU noise: {getattr(_C, 'CPU_NOISE', 'scalar')})"
    if device.type == "cuda":
        if not built_cuda:
            return False, "agm_fast._C was built without CUDA (torch without CUDA or no nvcc at build time)"
        return True, "agm_fast._C CUDA op"
    return False, f"agm_fast._C has no kernel for device type {device.type!r}"


def _require(device: torch.device) -> None:
    ok, why = available(device)
    if not ok:
        raise RuntimeError(f"the agm_fast._C Euler–Maruyama op cannot run on {device}: {why}")


# ----------------------------------------------------------------------------- fake kernels

if _C is not None:
    # Mutating ops with no outputs: the fake kernels only need to exist (shapes do not change).
    @torch.library.register_fake("agm_fast::em_step_")
    def _em_step_fake(x, drift, image_index, step, dt, sigma, seed_lo, seed_hi):
        return None

    @torch.library.register_fake("agm_fast::em_step_z_")
    def _em_step_z_fake(x, drift, z, dt, sigma):
        return None

    @torch.library.register_fake("agm_fast::em_step_last_")
    def _em_step_last_fake(x, drift, dt):
        return None


# ----------------------------------------------------------------------------- arguments

def step_tensor(step, device: torch.device) -> torch.Tensor:
    """int k (checked) → int64 tensor [1] on device; a tensor is passed on (the op checks it)."""
    if isinstance(step, torch.Tensor):
        return step
    return torch.tensor([checks.step(step)], dtype=torch.int64, device=device)


def _device_of(x, drift) -> torch.device:
    """x's device, once x and drift are known to be tensors (the op checks everything else)."""
    if not isinstance(x, torch.Tensor) or not isinstance(drift, torch.Tensor):
        raise TypeError(f"em_step: x and drift must be tensors, got {type(x).__name__} and {type(drift).__name__}")
    return x.device


def _in_place(x: torch.Tensor, run) -> torch.Tensor:
    """Run an op that needs contiguous x; a non-contiguous x goes through a contiguous copy."""
    if x.is_contiguous():
        run(x)
        return x
    tmp = x.contiguous()
    run(tmp)
    x.copy_(tmp)
    return x


# ----------------------------------------------------------------------------- the ops

def em_step_(x: torch.Tensor, drift: torch.Tensor, *, dt: float, sigma: float, seed: int, step,
             image_index) -> torch.Tensor:
    """x ← x + drift·dt + σ·sqrt(dt)·z in place, z = rng.normal(seed, step, image_index, ·, Stream.EM)."""
    device = _device_of(x, drift)
    _require(device)
    sigma = checks.sigma(sigma)
    lo, hi = rng.split_seed(seed)
    idx = checks.sample_index(image_index, x.shape[0] if x.dim() else 0, device, name="image_index")
    k = step_tensor(step, device)
    return _in_place(x, lambda xc: torch.ops.agm_fast.em_step_(xc, drift, idx, k, float(dt), sigma, lo, hi))


def em_step_z_(x: torch.Tensor, drift: torch.Tensor, z: torch.Tensor, *, dt: float, sigma: float) -> torch.Tensor:
    """x ← x + drift·dt + σ·sqrt(dt)·z in place with z given (fp32 arithmetic; z is read as fp32)."""
    _require(_device_of(x, drift))
    sigma = checks.sigma(sigma)
    return _in_place(x, lambda xc: torch.ops.agm_fast.em_step_z_(xc, drift, z, float(dt), sigma))


def em_step_last_(x: torch.Tensor, drift: torch.Tensor, *, dt: float) -> torch.Tensor:
    """x ← x + drift·dt in place: the noiseless last step (also every step when σ = 0)."""
    _require(_device_of(x, drift))
    return _in_place(x, lambda xc: torch.ops.agm_fast.em_step_last_(xc, drift, float(dt)))
