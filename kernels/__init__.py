"""Triton kernels of agm_fast, imported as agm_fast.kernels (docs/design.md §3).

    bridge_sample(x1, t, *, seed, step, sample_index, sigma) -> x_t
    weighted_bridge_loss(pred, x1, t, v, *, seed, step, sample_index, sigma, predicts, scheme,
                         favour, tau, clip, v_offset, normalizer) -> (loss, per_sample, weights)
    noise_sum(seed, step, sample_index, n_per_sample) -> [B]   (noise-only cost limit, bench)
    group_norm_silu(x, groups, weight, bias, *, eps, mode, e, scale, shift) -> y
        SiLU(GroupNorm(x) [+ e | ·(1 + scale) + shift]), forward and backward, NCHW or NHWC

Each mirrors its pure-PyTorch reference in agm_fast.bridge and draws x0, ε in-kernel from the
agm_fast.rng Philox stream. Modules: bridge_sample and weighted_bridge_loss (kernels, launch,
wrapper), group_norm_silu (the fused GroupNorm + SiLU of DriftUNet's blocks; reference: the
modules it replaces), philox (in-kernel Philox/Box–Muller, the noise-only kernel), utils (launch helpers and
argument checks), compile_check (ahead-of-time compilation for sm_80/sm_90). The kernels import
only agm_fast.rng, agm_fast.checks and each other (docs/design.md §4).

This file says whether they run: available() whether the Triton path runs natively (CUDA);
interpreter_active() whether it was built for Triton's CPU interpreter (TRITON_INTERPRET=1 set
before import), where it runs on CPU tensors for tests. This package imports without triton.
"""

from __future__ import annotations

import torch

try:
    import triton as _triton
except ImportError as _e:  # the reference path keeps working without triton
    _triton = None
    _TRITON_ERROR = f"triton is not installed ({_e})"
else:
    _TRITON_ERROR = None
    from . import philox, utils
    from .bridge_sample import bridge_sample
    from .group_norm_silu import group_norm_silu
    from .philox import noise_sum
    from .weighted_bridge_loss import weighted_bridge_loss

__all__ = ["available", "interpreter_active", "bridge_sample", "weighted_bridge_loss", "noise_sum",
           "group_norm_silu"]


def interpreter_active() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if _triton is None:
        return False
    return utils.is_interpreted(philox._noise_sum_kernel)


def available() -> tuple[bool, str]:
    """(whether the Triton path can run natively on CUDA here, why not / what runs)."""
    if _triton is None:
        return False, _TRITON_ERROR
    if not torch.cuda.is_available():
        return False, "no CUDA device (the kernels run on CPU only under TRITON_INTERPRET=1, for tests)"
    if interpreter_active():
        return False, "TRITON_INTERPRET=1 was set before import: Triton runs in its CPU interpreter"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 (the kernels use bf16)"
    return True, f"triton {_triton.__version__} on {torch.cuda.get_device_name()}"


if _triton is None:
    def _missing(*_args, **_kwargs):
        raise RuntimeError(f"agm_fast.kernels needs triton: {_TRITON_ERROR}")

    bridge_sample = weighted_bridge_loss = noise_sum = group_norm_silu = _missing
