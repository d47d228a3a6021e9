"""Every preset in configs/ runs one AGM training step on the CPU at its own resolution and channels
(batch 1), built by agm_fast.trainer.Trainer the way bench/bench_step.py builds its rows.

Presets whose drift net has more than REDUCE_ABOVE parameters (res128: 91M, res256: 114M; their
weights, EMA and AdamW state alone are gigabytes, and one step ~30 s) run at a reduced width so the
file stays within a minute on a 2-core CPU: model.channels=16 and potential.channels=[8, 16, 32]. Everything else of the preset is kept (depth,
channel multipliers, residual blocks, attention resolutions and heads, time injection, the
resolution and the channels of the data), so the step exercises the preset's architecture at its
size; only the widths shrink. demo32, res28, res32 and celeba64 (1.4–37M parameters) run as they are. One torch thread: on a busy 2-core machine two
threads wait at every OpenMP barrier and a step is up to 10× slower.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_step  # noqa: E402

from agm_fast import config as config_mod, models  # noqa: E402
from agm_fast.checkpoint import drift_arch  # noqa: E402

REDUCE_ABOVE = 50_000_000
REDUCED = ["model.channels=16", "potential.channels=[8,16,32]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 threads on 2 busy cores stall at every barrier


@pytest.mark.parametrize("preset", config_mod.preset_names())
def test_preset_runs_one_step(preset):
    cfg = config_mod.load(preset, ["data.path=unused"])
    with torch.device("meta"):  # the parameter count without allocating
        n_drift = models.count_parameters(models.DriftUNet(**drift_arch(cfg)))
    extra = REDUCED if n_drift > REDUCE_ABOVE else []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = bench_step.build(preset, bench_step.bench_overrides(torch.device("cpu"), 1, run_dir, 1)
                                   + extra + ["train.precision=fp32"])
        assert trainer.cfg.data.resolution == cfg.data.resolution
        before = [p.detach().clone() for p in trainer.drift.parameters()]
        run = bench_step.Runner(trainer)
        step, indices, x1 = next(iter(trainer.loader))
        assert x1.shape == (1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        diag = run()
        assert bool(diag["finite"]), f"{preset}: non-finite step"
        assert torch.isfinite(diag["loss_f"]) and torch.isfinite(diag["loss_v"])
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.drift.parameters()))
        assert changed, f"{preset}: the optimiser step left the drift net unchanged"
        with torch.no_grad():
            out = trainer.drift(x1, torch.full((1,), 0.5))
        assert out.shape == x1.shape
