"""The one place that knows there is more than one implementation of a fast path (docs/design.md §3).

Each switch resolves to (implementation, reason). `auto` means the fast path where it can run
and the reference elsewhere; an explicit fast path that cannot run is an error, never a
silent fallback. `agm-fast info` prints `describe()`.
"""

from __future__ import annotations

import logging
import sys

import torch

from . import bridge
from .config import check_choice

log = logging.getLogger("agm_fast")


class UnavailableError(ValueError):
    """An explicitly requested implementation cannot run here."""


def resolve_device(name, field: str = "device") -> torch.device:
    """'auto' → cuda when available, else cpu; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}={str(name)!r} but CUDA is not available; use auto or cpu")
    return dev


def _triton_status(device: torch.device) -> tuple[bool, str]:
    try:
        from agm_fast import kernels
    except Exception as e:  # an import error of triton itself must not break the package
        return False, f"agm_fast.kernels failed to import: {e}"
    ok, why = kernels.available()
    if device.type != "cuda":
        if kernels.interpreter_active():
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "Triton needs a CUDA device (or TRITON_INTERPRET=1 for tests on CPU)"
    return ok, why


def _ext_status(device: torch.device) -> tuple[bool, str]:
    from agm_fast import ext
    ok, why = ext.available(device)
    return ok, why


def resolve(switch: str, requested: str, device: torch.device) -> tuple[str, str]:
    """Resolve `train.kernels`, `sample.em` or `model.fused_norm` to the implementation that will run, with why.

    model.fused_norm resolves to 'torch' (the GroupNorm + SiLU modules) or 'triton'; DriftUNet applies
    the same rule itself on its first forward (models.resolve_fused_norm, as for model.attention)."""
    device = torch.device(device)
    if switch == "model.fused_norm":
        from agm_fast import models
        check_choice(switch, requested)
        try:
            return models.resolve_fused_norm(requested, device)
        except ValueError as e:
            raise UnavailableError(str(e)) from None
    if switch == "train.kernels":
        fast, status = "triton", _triton_status
    elif switch == "sample.em":
        fast, status = "ext", _ext_status
    else:
        raise ValueError(f"unknown switch {switch!r}")
    if check_choice(switch, requested) == "torch":
        return "torch", "reference PyTorch implementation (requested)"
    ok, why = status(device)
    if requested == fast:
        if not ok:
            raise UnavailableError(f"{switch}={fast} was requested but cannot run on {device}: {why}")
        return fast, why
    if ok and device.type == "cuda":  # requested == "auto" from here
        return fast, why
    if ok and fast == "ext":  # the C++ CPU op is a real fast path on CPU too
        return fast, why
    return "torch", f"auto: {why}" if not ok else f"auto: reference on {device.type} ({fast} only chosen on CUDA)"


# ----------------------------------------------------------------------------- bridge ops

def bridge_sample(impl: str, x1, t, *, seed, step, sample_index, sigma):
    """x_t for the batch; x0 and ε keyed by (seed, step, sample_index) and each element's logical
    index, so NCHW and channels_last x1 give the same values; x_t has x1's layout (either)."""
    if impl == "triton":
        from agm_fast import kernels
        # validate=False: the trainer draws t itself, and the check costs a device sync per call
        return kernels.bridge_sample(x1, t, seed=seed, step=step, sample_index=sample_index, sigma=sigma,
                                     validate=False)
    x0, eps = bridge.draw_bridge_noise(seed, step, sample_index, x1.shape, x1.device)
    x_t = bridge.bridge_sample(x1.float(), t, x0, eps, sigma).to(x1.dtype)
    # x1's layout, as the triton path returns (the noise is NCHW, which the elementwise ops follow)
    if x1.dim() == 4 and not x1.is_contiguous() and x1.is_contiguous(memory_format=torch.channels_last):
        return x_t.contiguous(memory_format=torch.channels_last)
    return x_t


def weighted_bridge_loss(impl: str, pred, x1, t, v, **kw) -> bridge.LossOutput:
    """The AGM drift loss (paper Eq. 13) of one chunk; see bridge.weighted_bridge_loss. pred and x1
    may be NCHW or channels_last: the same values either way."""
    if impl == "triton":
        from agm_fast import kernels
        return bridge.LossOutput(*kernels.weighted_bridge_loss(pred, x1, t, v, validate=False, **kw))
    return bridge.weighted_bridge_loss(pred, x1, t, v, **kw)


# ----------------------------------------------------------------------------- info

def describe(device: torch.device | str = "cpu", train_kernels: str = "auto", sample_em: str = "auto",
             attention: str = "auto", fused_norm: str = "auto") -> dict[str, tuple[str, str]]:
    """What `auto` (or the given choices) resolves to on `device`, with the reason for each."""
    from agm_fast import models
    device = torch.device(device)
    out = {}
    for switch, req in (("train.kernels", train_kernels), ("sample.em", sample_em), ("model.fused_norm", fused_norm)):
        try:
            out[switch] = resolve(switch, req, device)
        except ValueError as e:
            out[switch] = ("unavailable", str(e))
    try:
        out["model.attention"] = models.resolve_attention(attention, device)
    except ValueError as e:
        out["model.attention"] = ("unavailable", str(e))
    ok, why = _triton_status(device)
    out["triton"] = ("available" if ok else "unavailable", why)
    ok, why = _ext_status(device)
    out["agm_fast._C"] = ("available" if ok else "unavailable", why)
    from agm_fast import dali
    ok, why = dali.status()
    other = "dali" if ok and device.type == "cuda" else "torch"
    out["data.loader"] = (f"memory or {other}", f"memory when the set fits data.memory_budget_gb, else {other} "
                          f"({why}{'' if device.type == 'cuda' else '; DALI is picked only on CUDA'})")
    return out


def package_versions() -> dict:
    """Versions of Python, torch, numpy, CUDA, Triton and agm_fast (recorded with runs and benchmarks)."""
    import numpy
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
         "cuda": torch.version.cuda}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    from . import __version__
    v["agm_fast"] = __version__
    return v
