"""Argument checks at the public entry points of the ops (docs/design.md §4: validate once, at the edges).

Owns the one definition of each check that the reference math (agm_fast.bridge), the noise
(agm_fast.rng), the Triton kernels (agm_fast.kernels) and the compiled op's wrapper
(agm_fast.ext) share: the Philox key parts (seed, step word, global sample indices), the
bridge's σ, plain numbers and choices, and the storage dtypes the fast paths read and write;
also the values the ops implement for their choice-valued arguments. Each check returns the
checked value in the form its callers use, or raises a one-line ValueError/TypeError that
names the argument. Internal helpers of the ops trust their callers and never call these again.

Imports only torch and math, so every ops module can use it (it sits at the bottom with rng).
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF  # a Philox counter or key word: an integer in [0, 2**32)

# The storage dtypes of the fast paths; arithmetic is fp32. The Triton kernels check against this
# list; agm_fast._C checks the same three in C++ (is_float_storage in csrc/em_step_torch.h).
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The values the ops implement for their choice-valued arguments (the reference in
# agm_fast.bridge and the Triton kernels take the same ones).
PREDICTS = ("drift", "x1")                                # what the network outputs
SCHEMES = ("softmax", "uniform")                          # importance-weight scheme
FAVOURS = ("coherent", "degenerate")                      # which bridges the softmax favours
NORMALISE = ("batch", "t_bins")                           # where V is standardised (docs/design.md §1)
NEGATIVES = ("pixel_shuffle", "patch_shuffle", "noise")   # structure-destroyed copies of x1
ATTENTION = ("auto", "xformers", "sdpa", "math")          # DriftUNet's attention backends
TIME_INJECTIONS = ("add", "scale_shift")                  # how DriftUNet's blocks take t
TIME_INPUTS = ("channel", "film")                         # how PotentialNet takes t
ADAMW_IMPLS = ("auto", "for_loop", "foreach", "fused")   # optim.impl: torch AdamW's implementations
COMPILE_MODES = ("off", "nets", "step")                   # train.compile: none | both nets | the whole AGM iteration
FUSED_NORMS = ("off", "triton", "auto")                   # DriftUNet's GroupNorm + SiLU: modules | Triton kernel | triton on CUDA


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def seed(value) -> int:
    """A seed: an integer in [0, 2**64) (the two Philox key words)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {value!r}")
    return value


def step(value) -> int:
    """A step word (training step or EM step index k): an integer in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MASK32:
        raise ValueError(f"step must be an integer in [0, 2**32), got {value!r}")
    return value


def number(name: str, value, *, positive: bool = False, allow_inf: bool = False) -> float:
    """A real number as a float: > 0 (positive) or >= 0, finite unless allow_inf (then +inf too)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
          and (value > 0 if positive else value >= 0) and (allow_inf or not math.isinf(value)))
    if not ok:
        bound = "> 0" if positive else ">= 0"
        kind = "a float, inf allowed" if allow_inf else "a finite float"
        raise ValueError(f"{name} must be {bound} ({kind}), got {value!r}")
    return float(value)


def sigma(value) -> float:
    """σ of the bridge as a float: finite and >= 0 (σ = 0: deterministic bridge / probability-flow ODE)."""
    return number("sigma", value)


def one_of(name: str, value, allowed: tuple[str, ...]) -> str:
    """value if it is one of `allowed` (the values the op implements), else a ValueError naming the argument."""
    if not isinstance(value, str) or value not in allowed:
        quoted = [repr(a) for a in allowed]
        choices = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ValueError(f"{name} must be {choices}, got {value!r}")
    return value


def storage_tensor(name: str, x) -> torch.Tensor:
    """x if it is a tensor of a storage dtype (float32, bfloat16, float16), else a TypeError."""
    if not isinstance(x, torch.Tensor) or x.dtype not in STORAGE_DTYPES:
        names = ", ".join(_dtype_name(d) for d in STORAGE_DTYPES)
        got = _dtype_name(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must have dtype in ({names}), got {got}")
    return x


def sample_index(value, batch: int | None = None, device: torch.device | str | None = None, *,
                 name: str = "sample_index") -> torch.Tensor:
    """Global sample indices (the Philox counter word of each row) as a contiguous int64 [B] tensor.

    value: an integer tensor, a sequence of ints, or an int b0 meaning rows b0, b0 + 1, …
    (`batch` of them; one when batch is None). With batch, the count must equal it. Values must
    lie in [0, 2**32): checked for ints and for indices on the host before or after the move to
    `device`; indices that stay on a GPU are trusted (the check would cost a device→host sync
    per call). The result is on `device` (default: where the indices are); indices that are
    already an int64 contiguous tensor there are not copied.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        count = 1 if batch is None else batch
        lo, hi, idx = value, value + count - 1, None
    else:
        if not isinstance(value, (torch.Tensor, bool)):
            try:
                value = torch.as_tensor(value)
                value = value.to(torch.int64) if value.numel() == 0 else value  # [] has no int dtype
            except (TypeError, ValueError, RuntimeError):
                pass  # refused just below
        if (not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex()
                or value.dtype == torch.bool):
            got = _dtype_name(value.dtype) if isinstance(value, torch.Tensor) else repr(value)
            raise TypeError(f"{name} must be an integer tensor, an int or a sequence of ints, got {got}")
        if batch is not None and value.numel() != batch:
            raise ValueError(f"{name} must hold one global index per sample (B={batch}), "
                             f"but the {name} tensor holds {value.numel()}")
        idx = value.detach().reshape(-1).to(torch.int64)
        if idx.device.type != "cpu" and device is not None:
            idx = idx.to(device)  # first, so that indices moving to the host are checked there
        # host indices are checked; device indices and traced ones (torch.compile) are trusted
        host = idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling()
        lo, hi = (int(idx.min()), int(idx.max())) if host else (0, 0)
    if lo < 0 or hi > MASK32:
        raise ValueError(f"global sample indices ({name}) must lie in [0, 2**32), got values in [{lo}, {hi}]")
    if idx is None:
        return torch.arange(lo, hi + 1, dtype=torch.int64, device=device)
    return idx.to(idx.device if device is None else device).contiguous()
