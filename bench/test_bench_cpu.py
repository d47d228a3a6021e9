"""CPU-sized pytest-benchmark cases: the whole AGM step at demo32 size (the rows of bench_step.py,
through the same Trainer-built step) and its main pieces. Timings are of this CPU; compare runs of
one machine with --benchmark-autosave / --benchmark-compare (README "Benchmarks").

Each case builds once, warms up (lazy initialisation, the first forward's resolution of the
attention backend and norm implementation), then times rounds of one call.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

import bench_step
from agm_fast import bridge, dispatch, models

BATCH = 8          # demo32's nets at batch 8: about a tenth of a second per step on one core
THREADS = 1        # comparable runs: two threads on cores other work shares wait at every OpenMP barrier


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _trainer(*overrides):
    run_dir = tempfile.mkdtemp(prefix="bench_cpu_")
    return bench_step.build("demo32", bench_step.bench_overrides(torch.device("cpu"), BATCH, run_dir, THREADS)
                            + ["train.precision=fp32", *overrides])


STEP_ROWS = {"agm fp32": [], "drift-only fp32": ["weights.scheme=uniform"],
             "agm fp32 channels_last": ["model.channels_last=true"], "agm fp32 foreach AdamW": ["optim.impl=foreach"]}


@pytest.mark.parametrize("row", list(STEP_ROWS))
def test_step(benchmark, row):
    """next(loader) + one AGM step (both nets forward and backward, AdamW, EMA)."""
    run = bench_step.Runner(_trainer(*STEP_ROWS[row]))
    benchmark.extra_info.update(batch=BATCH, preset="demo32", overrides=STEP_ROWS[row])
    benchmark.pedantic(run, rounds=5, warmup_rounds=2)


@pytest.fixture(scope="module")
def trainer():
    return _trainer()


@pytest.fixture(scope="module")
def batch(trainer):
    step, indices, x1 = next(iter(trainer.loader))
    return indices, x1


def test_drift_forward_backward(benchmark, trainer, batch):
    """The drift U-Net forward + backward at the step's batch (the bulk of a step)."""
    _, x1 = batch
    t = torch.rand(x1.shape[0])

    def run():
        trainer.drift(x1, t).square().mean().backward()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def test_potential_forward_backward(benchmark, trainer, batch):
    """V_φ on x_t⁺ and x_t⁻ with its hinge loss, forward + backward."""
    _, x1 = batch
    t = torch.rand(x1.shape[0])
    margin = trainer.cfg.potential.margin

    def run():
        vp, vn = trainer.potential(x1, t), trainer.potential(x1.flip(0), t)
        bridge.potential_hinge_loss(vp, vn, margin).backward()
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


def test_bridge_sample(benchmark, trainer, batch):
    """x_t of the batch with keyed noise (train.kernels=torch: the Philox reference in PyTorch)."""
    indices, x1 = batch
    t = bridge.sample_t(0, 3, indices, trainer.cfg.bridge.t_min, trainer.cfg.bridge.t_eps, x1.device)
    benchmark(lambda: dispatch.bridge_sample("torch", x1, t, seed=0, step=3, sample_index=indices,
                                             sigma=trainer.cfg.bridge.sigma))


def test_weighted_loss(benchmark, trainer, batch):
    """The AGM drift loss (softmax weights of V, x1 target), forward + backward."""
    indices, x1 = batch
    cfg = trainer.cfg
    w = cfg.weights
    t = bridge.sample_t(0, 3, indices, cfg.bridge.t_min, cfg.bridge.t_eps, x1.device)
    v = torch.randn(x1.shape[0])
    pred = torch.randn_like(x1, requires_grad=True)

    def run():
        out = dispatch.weighted_bridge_loss("torch", pred, x1, t, v, seed=0, step=3, sample_index=indices,
                                            sigma=cfg.bridge.sigma, predicts=cfg.model.predicts, scheme=w.scheme,
                                            favour=w.favour, tau=w.tau, clip=w.clip, normalise=w.normalise,
                                            t_bins=w.t_bins, t_all=t, v_offset=0, normalizer=x1.shape[0])
        out.loss.backward()
    benchmark(run)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu(benchmark, channels_last):
    """GroupNorm + SiLU as the modules (model.fused_norm=off), forward + backward, at the size of
    demo32's first level (12 channels at 32², batch 8)."""
    norm = torch.nn.GroupNorm(models.norm_groups(12), 12)
    x = torch.randn(BATCH, 12, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    benchmark(lambda: models.norm_silu(norm, x, "torch").sum().backward())


@pytest.mark.parametrize("impl", ["for_loop", "foreach"])
def test_adamw(benchmark, impl):
    """One AdamW step of both demo32 nets with optim.impl=for_loop / foreach."""
    tr = _trainer(f"optim.impl={impl}")
    for p in list(tr.drift.parameters()) + list(tr.potential.parameters()):
        p.grad = torch.randn_like(p)

    def run():
        tr.opt_f.step()
        tr.opt_v.step()
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
