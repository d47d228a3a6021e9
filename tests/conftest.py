"""Shared test set-up.

Triton runs on CPU tensors only in interpreter mode, which must be chosen before triton is
imported: without CUDA, set TRITON_INTERPRET=1 here, before any test module imports kernels.
AGM_FAST_REQUIRE (set by .ci/run, e.g. ext,triton) turns "not installed" skips into failures.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.use_deterministic_algorithms(True, warn_only=True)

REQUIRED = {s.strip() for s in os.environ.get("AGM_FAST_REQUIRE", "").split(",") if s.strip()}


def skip_unless_available(component: str, available: bool, why: str) -> None:
    """Skip with the reason when `component` is missing, or fail if AGM_FAST_REQUIRE names it."""
    if available:
        return
    if component in REQUIRED:
        pytest.fail(f"{component} is required (AGM_FAST_REQUIRE) but unavailable: {why}")
    pytest.skip(f"{component} unavailable: {why}")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
