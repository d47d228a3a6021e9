"""The compiled extension agm_fast._C: the fused Euler–Maruyama op (DESIGN.md §1 "sampling", §3).

This is the only module that imports agm_fast._C. Importing it never fails: `available()` says
whether the op can run and why not. The ops are torch.library custom operators (schemas and
CPU/CUDA kernels in csrc/em_step.cpp) with fake kernels registered here, so they trace under
torch.compile and are captured by CUDA graphs (they read `step` and `image_index` from device
memory and never synchronise).

    em_step_(x, drift, *, dt, sigma, seed, step, image_index)   x ← x + drift·dt + σ·sqrt(dt)·z
        z = agm_fast.rng.normal(seed, step, image_index, x[0].numel(), rng.Stream.EM), drawn in-op
    em_step_z_(x, drift, z, *, dt, sigma)                       same with z given (parity tests)
    em_step_last_(x, drift, *, dt)                              x ← x + drift·dt (noiseless last step)

Image indices (the Philox key of each row, so noise does not depend on batching): either an int
b0, meaning rows b get global indices b0 + b, or an int64 tensor [B] of global indices on x's
device. The step: an int, or an int64 one-element tensor on x's device (what a CUDA graph
advances). x is updated in place and returned; fp32/bf16/fp16 storage, fp32 arithmetic.
"""

from __future__ import annotations

import math

import torch

from . import rng
from .bridge import check_sigma

_C = None
_IMPORT_ERROR: str | None = None
try:
    from agm_fast import _C  # noqa: F401  (registers torch.ops.agm_fast.*)
except Exception as err:  # missing or broken build: the package must still import
    _IMPORT_ERROR = f"agm_fast._C is not built or failed to load ({type(err).__name__}: {err}); " \
                    "rebuild with: pip install --no-build-isolation -e ."

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


# ----------------------------------------------------------------------------- argument checks

def _check_x_drift(x: torch.Tensor, drift: torch.Tensor, dt: float) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(drift, torch.Tensor):
        raise TypeError("em_step: x and drift must be tensors")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"em_step: x must be float32, bfloat16 or float16; got {x.dtype}")
    if drift.dtype not in FLOAT_DTYPES:
        raise TypeError(f"em_step: drift must be float32, bfloat16 or float16; got {drift.dtype}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"em_step: x must be [B, ...] with B ≥ 1; got shape {tuple(x.shape)}")
    if drift.shape != x.shape:
        raise ValueError(f"em_step: drift shape {tuple(drift.shape)} must equal x shape {tuple(x.shape)}")
    if drift.device != x.device:
        raise ValueError(f"em_step: drift is on {drift.device} but x is on {x.device}")
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"em_step: dt must be a finite positive float; got {dt!r}")


def image_index_tensor(image_index, batch: int, device: torch.device) -> torch.Tensor:
    """int base b0 → arange(b0, b0 + B); an int64 tensor [B] is checked and passed through."""
    if isinstance(image_index, bool):
        raise TypeError("em_step: image_index must be an int or an int64 tensor [B], not a bool")
    if isinstance(image_index, int):
        if image_index < 0 or image_index + batch - 1 > rng.MASK32:
            raise ValueError(f"em_step: image indices {image_index}…{image_index + batch - 1} must lie in [0, 2**32)")
        return torch.arange(image_index, image_index + batch, dtype=torch.int64, device=device)
    if not isinstance(image_index, torch.Tensor):
        raise TypeError(f"em_step: image_index must be an int or an int64 tensor [B]; got {type(image_index).__name__}")
    if image_index.dtype != torch.int64 or image_index.shape != (batch,):
        raise ValueError(f"em_step: image_index tensor must be int64 of shape [{batch}]; got "
                         f"{image_index.dtype} {tuple(image_index.shape)}")
    if image_index.device != device:
        raise ValueError(f"em_step: image_index is on {image_index.device} but x is on {device}")
    return image_index.contiguous()


def step_tensor(step, device: torch.device) -> torch.Tensor:
    """int k → int64 tensor [1] on device; an int64 one-element tensor is checked and passed through."""
    if isinstance(step, bool):
        raise TypeError("em_step: step must be an int or an int64 tensor with one element, not a bool")
    if isinstance(step, int):
        return torch.tensor([rng.check_step(step)], dtype=torch.int64, device=device)
    if not isinstance(step, torch.Tensor) or step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError("em_step: step must be an int or an int64 tensor with one element")
    if step.device != device:
        raise ValueError(f"em_step: step is on {step.device} but x is on {device}")
    return step


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
    _check_x_drift(x, drift, dt)
    check_sigma(sigma)
    _require(x.device)
    lo, hi = rng.split_seed(seed)
    idx = image_index_tensor(image_index, x.shape[0], x.device)
    k = step_tensor(step, x.device)
    return _in_place(x, lambda xc: torch.ops.agm_fast.em_step_(xc, drift, idx, k, float(dt), float(sigma), lo, hi))


def em_step_z_(x: torch.Tensor, drift: torch.Tensor, z: torch.Tensor, *, dt: float, sigma: float) -> torch.Tensor:
    """x ← x + drift·dt + σ·sqrt(dt)·z in place with z given (fp32 arithmetic; z is read as fp32)."""
    _check_x_drift(x, drift, dt)
    check_sigma(sigma)
    if not isinstance(z, torch.Tensor) or z.shape != x.shape or z.device != x.device:
        raise ValueError(f"em_step_z: z must be a tensor of x's shape {tuple(x.shape)} on {x.device}")
    _require(x.device)
    return _in_place(x, lambda xc: torch.ops.agm_fast.em_step_z_(xc, drift, z, float(dt), float(sigma)))


def em_step_last_(x: torch.Tensor, drift: torch.Tensor, *, dt: float) -> torch.Tensor:
    """x ← x + drift·dt in place: the noiseless last step (also every step when σ = 0)."""
    _check_x_drift(x, drift, dt)
    _require(x.device)
    return _in_place(x, lambda xc: torch.ops.agm_fast.em_step_last_(xc, drift, float(dt)))
