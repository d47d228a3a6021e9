"""Shared test set-up.

Triton runs on CPU tensors only in interpreter mode, which must be chosen before triton is
imported: without CUDA, set TRITON_INTERPRET=1 here, before any test module imports kernels.
AGM_FAST_REQUIRE (set by .ci/run, e.g. ext,triton) turns "not installed" skips into failures.
"""

import os
import time
from pathlib import Path

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-net tests: they gain nothing from threads, and on
    a loaded machine the thread hand-off costs ~70× (a 16×2×8×8 conv: 19 ms with 2 threads, 0.3 ms
    with 1). Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def wait_for_lines(path: Path, n: int, proc, timeout: float = 120) -> None:
    """Wait until the file `path` (e.g. a run's metrics.jsonl) has n lines while the subprocess
    `proc` runs; fail with the end of its stderr if it exits first, kill it on a timeout."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err
            pytest.fail(f"training exited early: {err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"training made no progress in {timeout:.0f} s ({path} has fewer than {n} lines)")
