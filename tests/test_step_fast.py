"""The training step's fast paths against the eager step (docs/design.md §3, agm_fast/step.py).

optim.impl: auto on the CPU is bit for bit what the trainer ran before the switch (torch's
default AdamW); foreach and fused land on for_loop's parameters and moments within fp32 rounding;
a checkpoint written under one implementation resumes under another.
train.compile: nets and step give the eager losses within the parity rule, and after the first
step no call compiles again (torch._dynamo.config.error_on_recompile, and the count of unique
graphs). One compilation per mode, tiny MLPs: each takes 30–90 s on a loaded 2-core CPU.
train.cuda_graph: refused off CUDA and for what cannot be captured; the graphed step's body
(static buffers, device-side guard) runs eagerly on the CPU and equals AGMStep bit for bit, a
skipped non-finite step included; the capture itself needs CUDA.
"""

import copy
import json
import math
import time

import pytest
import torch
from torch import nn

from agm_fast import checkpoint, config
from agm_fast import step as step_mod
from agm_fast.config import ConfigError
from agm_fast.step import (AGMStep, GraphedAGMStep, build_optimisers, check_compile, check_cuda_graph,
                           resolve_adamw_impl, set_adamw_impl)
from tests.conftest import needs_cuda

CPU = torch.device("cpu")
SHAPE = (1, 4, 4)
B = 6
BASE = ["train.kernels=torch", "train.precision=fp32", "train.device=cpu", f"train.batch_size={B}",
        "train.steps=20", "optim.lr=1e-2", "optim.lr_potential=5e-3", "optim.warmup_steps=2",
        "optim.grad_clip=0.05", "optim.weight_decay=0.1", "ema.halflife_kimg=0.05", "model.predicts=drift"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run faster on one thread


class Drift(nn.Module):
    """f(x, t) → x's shape; the buffer counts images, so that the EMA's buffer copy shows."""

    def __init__(self, hidden=16):
        super().__init__()
        d = math.prod(SHAPE)
        self.inp, self.out = nn.Linear(d + 1, hidden), nn.Linear(hidden, d)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x, t):
        self.seen += x.shape[0]
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)))
        return self.out(h).reshape(x.shape)


class Potential(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.inp, self.out = nn.Linear(math.prod(SHAPE) + 1, hidden), nn.Linear(hidden, 1)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)))).squeeze(1)


def make_cfg(*overrides):
    return config.load("demo32", BASE + list(overrides))


def make(impl="for_loop", compile="off", cfg=None, default_adamw=False, device=CPU):
    """An AGMStep on fresh tiny nets (the same weights every time), as the trainer builds it."""
    cfg = cfg or make_cfg(f"train.compile={compile}")
    torch.manual_seed(0)
    drift, potential = Drift().to(device), Potential().to(device)
    ema = copy.deepcopy(drift).eval().requires_grad_(False)
    if default_adamw:  # what agm_fast/trainer.py built before optim.impl existed
        o = cfg.optim
        opt_f = torch.optim.AdamW(drift.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        opt_v = torch.optim.AdamW(potential.parameters(), lr=o.lr_potential, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)
    else:
        opt_f, opt_v = build_optimisers(cfg, drift, potential, impl)
    return AGMStep(cfg, drift, potential, ema, opt_f, opt_v, device=device, kernels="torch", autocast_dtype=None)


def batches(n, nan_at=None):
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(n):
        x1 = torch.rand((B, *SHAPE), generator=g) * 2 - 1
        if k == nan_at:
            x1[2, 0, 1, 1] = float("nan")
        out.append((torch.arange(B, dtype=torch.int64) + k * B, x1))
    return out


def tensors(step):
    """Parameters of both nets and the EMA, the EMA's buffers, and both optimisers' state."""
    out = {}
    for name, net in (("drift", step.drift), ("potential", step.potential), ("ema", step.ema)):
        out.update({f"{name}.{k}": v.detach() for k, v in net.state_dict().items()})
    for name, opt, net in (("opt_f", step.opt_f, step.drift), ("opt_v", step.opt_v, step.potential)):
        for i, p in enumerate(net.parameters()):
            out.update({f"{name}.{i}.{k}": torch.as_tensor(v).detach().cpu()
                        for k, v in opt.state.get(p, {}).items()})
    return out


def run(step, data, k0=0):
    dev = step.device
    return [step(idx.to(dev), x1.to(dev), k0 + k) for k, (idx, x1) in enumerate(data)]


# ----------------------------------------------------------------------------- optim.impl

def test_optim_impl_resolves_auto_per_device_and_names_the_field_on_a_bad_value():
    assert resolve_adamw_impl("auto", CPU)[0] == "for_loop"
    assert resolve_adamw_impl("auto", torch.device("cuda"))[0] == "fused"
    for impl in ("for_loop", "foreach", "fused"):
        assert resolve_adamw_impl(impl, CPU) == (impl, "requested")
    with pytest.raises(ConfigError, match="optim.impl='adam'.*for_loop, foreach, fused"):
        resolve_adamw_impl("adam", CPU)
    with pytest.raises(ConfigError, match="optim.impl"):
        make_cfg("optim.impl=fast")


def test_auto_on_cpu_gives_the_torch_default_adamw_bit_for_bit():
    """The demo's numbers do not move: optim.impl=auto on the CPU is what torch.optim.AdamW()
    with no implementation flags ran before."""
    impl, _ = resolve_adamw_impl("auto", CPU)
    data = batches(3)
    ref, new = make(default_adamw=True), make(impl)
    run(ref, data)
    run(new, data)
    a, b = tensors(ref), tensors(new)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diffs(a, b):
    """Largest |a − b| relative to max|a| per kind of tensor (parameters, Adam moments)."""
    out = {}
    for kind in ("drift.", "potential.", "ema.", "exp_avg", "exp_avg_sq"):
        keys = [k for k in a if (k.startswith(kind) if kind.endswith(".") else k.endswith("." + kind))]
        scale = max(a[k].abs().max().item() for k in keys)
        out[kind.strip(".")] = max((a[k].double() - b[k].double()).abs().max().item() for k in keys) / scale
    return out


# AdamW's update p ← p − lr·m̂/(√v̂ + ε) evaluated in another order (fused's single pass): within a
# few fp32 ulps. Measured after 4 steps, relative to the largest value: foreach 0 (bit for bit on
# the CPU), fused 3.9e-11 on the weights and 2.4e-8 on the Adam moments; the bound is the parity
# rule's fp32 elementwise floor.
IMPL_TOL = 1e-6


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_foreach_and_fused_land_on_for_loops_weights_within_fp32_rounding(impl):
    data = batches(4)
    ref, fast = make("for_loop"), make(impl)
    d_ref, d_fast = run(ref, data), run(fast, data)
    for a, b in zip(d_ref, d_fast):  # the first step's losses are the same computation: equal
        assert bool(a["finite"]) and bool(b["finite"])
    assert torch.equal(d_ref[0]["loss_f"], d_fast[0]["loss_f"])
    diffs = max_diffs(tensors(ref), tensors(fast))
    assert all(v <= IMPL_TOL for v in diffs.values()), diffs
    assert fast.opt_f.param_groups[0][impl] and not ref.opt_f.param_groups[0]["foreach"]


@pytest.mark.parametrize("src,dst", [("fused", "for_loop"), ("for_loop", "fused"), ("foreach", "fused")])
def test_a_checkpoint_resumes_under_another_optim_impl(tmp_path, src, dst):
    """The optimiser state is the same tensors for every implementation: a checkpoint written
    under `src` loads under `dst` (the trainer re-applies its own flags with set_adamw_impl) and
    the next step lands where `src` continuing would, within IMPL_TOL."""
    cfg = make_cfg(f"train.run_dir={tmp_path}")
    data = batches(3)
    a = make(src, cfg=cfg)
    run(a, data[:2])
    ckpt = checkpoint.save(tmp_path, step=2, cfg=cfg, drift=a.drift, potential=a.potential, ema=a.ema,
                           opt_f=a.opt_f, opt_v=a.opt_v, nonfinite=0)
    b = make(dst, cfg=cfg)
    checkpoint.load(ckpt, cfg=cfg, drift=b.drift, potential=b.potential, ema=b.ema, opt_f=b.opt_f,
                    opt_v=b.opt_v, device=CPU)
    for opt in (b.opt_f, b.opt_v):
        set_adamw_impl(opt, dst)
        g = opt.param_groups[0]
        assert (g["foreach"], g["fused"]) == (dst == "foreach", dst == "fused")
    sa, sb = tensors(a), tensors(b)
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape and torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    run(a, data[2:], k0=2)
    run(b, data[2:], k0=2)
    diffs = max_diffs(tensors(a), tensors(b))
    assert all(v <= IMPL_TOL for v in diffs.values()), diffs


# ----------------------------------------------------------------------------- train.compile

def test_compile_step_refuses_the_triton_kernels_torchrun_and_inductor_on_the_cpu():
    cfg, cuda = make_cfg("train.compile=step"), torch.device("cuda")
    with pytest.raises(ConfigError, match="train.compile=step.*train.kernels=triton"):
        check_compile(cfg, "triton", None, cuda)
    with pytest.raises(ConfigError, match="train.compile=step runs one process"):
        check_compile(cfg, "torch", object(), cuda)
    with pytest.raises(ConfigError, match="train.compile=step runs the whole batch.*train.micro_batch=2"):
        check_compile(make_cfg("train.compile=step", "train.micro_batch=2"), "torch", None, cuda)
    with pytest.raises(ConfigError, match="train.compile=step is refused on the CPU.*Philox"):
        check_compile(cfg, "torch", None, CPU)
    assert check_compile(cfg, "torch", None, cuda) == "step"
    assert check_compile(make_cfg("train.compile=nets"), "triton", object(), CPU) == "nets"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nets", "step"])
def test_compiled_steps_match_eager_and_never_recompile(mode, monkeypatch):
    """4 steps: losses and grad norms within the parity rule's fp32 reduction bound (1e-5
    relative), the weights after them within 1e-5 of max|w|. Recompilation: after the first
    step, steps run under error_on_recompile (a recompilation raises) and add no graph. The step
    word is a device tensor (never a guard), and the forward half has no host read (the index
    check is skipped while tracing, the weights' all-equal case is decided on the device), so
    train.compile=step is one graph.
    The step mode runs with the aot_eager backend here (step.STEP_BACKEND: inductor's CPU code for
    the Philox noise is wrong); the same test with inductor runs on CUDA."""
    if mode == "step":
        monkeypatch.setattr(step_mod, "STEP_BACKEND", "aot_eager")
    compiled_steps_match_eager(mode, CPU)


def compiled_steps_match_eager(mode, device):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    data = batches(4)
    eager, comp = make(device=device), make(compile=mode, device=device)
    assert comp.compile == mode
    warm = 1
    t0 = time.perf_counter()
    d_comp = run(comp, data[:warm])
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2 if mode == "nets" else graphs == 1  # the two nets | the whole forward half
    with torch._dynamo.config.patch(error_on_recompile=True):
        d_comp += run(comp, data[warm:], k0=warm)
    assert counters["stats"]["unique_graphs"] == graphs
    assert comp.compile_seconds is not None and comp.compile_seconds <= first
    print(f"train.compile={mode}: first step {comp.compile_seconds:.1f} s ({device.type}, compilation included), "
          f"{graphs} graphs")
    d_eager = run(eager, data)
    for k, (e, c) in enumerate(zip(d_eager, d_comp)):
        assert bool(c["finite"])
        for name in ("loss_f", "loss_v", "grad_norm_f", "grad_norm_v", "ess"):
            assert c[name].item() == pytest.approx(e[name].item(), rel=1e-5, abs=1e-7), (k, name)
    a, b = tensors(eager), tensors(comp)
    for key in a:
        if key.split(".")[0] in ("drift", "potential", "ema"):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5 * a[key].abs().max().item() + 1e-7,
                                       msg=lambda m: f"{key}: {m}")


@needs_cuda
@pytest.mark.parametrize("mode", ["nets", "step"])
def test_compiled_steps_match_eager_and_never_recompile_on_cuda(mode):
    """As above with inductor on CUDA (Triton code for the Philox noise); no index check reads the
    host there, so error_on_recompile holds from step 1 in both modes."""
    compiled_steps_match_eager(mode, torch.device("cuda"))


# ----------------------------------------------------------------------------- train.cuda_graph

def test_cuda_graph_is_refused_on_the_cpu_naming_the_field_and_device(tmp_path):
    cfg = make_cfg("train.cuda_graph=true")
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true needs a CUDA device; train.device resolved to cpu"):
        check_cuda_graph(cfg, CPU, "torch", "fused", None)
    from agm_fast.trainer import Trainer
    with pytest.raises(ConfigError, match="train.cuda_graph.*cpu"):
        Trainer(make_cfg("train.cuda_graph=true", f"train.run_dir={tmp_path}"))


@pytest.mark.parametrize("overrides,kernels,impl,dist,match", [
    ([], "torch", "fused", object(), "one process only"),
    (["train.compile=step"], "torch", "fused", None, "train.compile=step"),
    ([], "triton", "fused", None, "train.kernels=triton"),
    ([], "torch", "foreach", None, "optim.impl=fused.*resolved to foreach"),
    (["model.dropout=0.1"], "torch", "fused", None, "model.dropout=0"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(overrides, kernels, impl, dist, match):
    cfg = make_cfg("train.cuda_graph=true", *overrides)
    with pytest.raises(ConfigError, match=match):
        check_cuda_graph(cfg, torch.device("cuda"), kernels, impl, dist)
    check_cuda_graph(make_cfg("train.cuda_graph=true", "train.compile=nets"), torch.device("cuda"), "torch",
                     "fused", None)  # what it can capture passes


@pytest.mark.parametrize("micro", [0, 3])
def test_the_graphed_body_equals_the_step_a_skipped_nan_step_included(micro):
    """GraphedAGMStep's body on its static buffers (learning rates as device tensors, the guard as
    fused AdamW's found_inf and a torch.where on the EMA) against AGMStep with the same fused
    AdamW over 5 steps: the same diagnostics bit for bit; step 2 holds a NaN and changes nothing;
    the state is the same bit for bit through step 3, and at step 4 within fp32 rounding (fused
    AdamW's update after a found_inf skip differs from one after a skipped call by ≤ 1 ulp per
    element, measured 4.8e-8 of max|w| here; plain tensors outside the step show the same)."""
    data = batches(5, nan_at=2)
    cfg = make_cfg(f"train.micro_batch={micro}")
    eager = make("fused", cfg=cfg)
    graphed = GraphedAGMStep(make("fused", cfg=cfg))
    assert isinstance(graphed.step.opt_f.param_groups[0]["lr"], torch.Tensor)
    for k, (idx, x1) in enumerate(data):
        before = tensors(graphed.step)
        de, dg = eager(idx, x1, k), graphed(idx, x1, k)
        assert graphed.x1.data_ptr() != x1.data_ptr()  # the batch was copied into the static buffer
        for name in de:
            assert torch.equal(de[name], dg[name]) or (de[name].isnan() == dg[name].isnan()).all(), (k, name)
        assert bool(dg["finite"]) == (k != 2)
        now = tensors(graphed.step)
        if k == 2:  # parameters, EMA and its buffer, Adam moments and step counts: untouched (the
            # drift's own image counter did see the NaN batch's forward)
            assert all(torch.equal(before[key], now[key]) for key in now if key != "drift.seen")
        ref = tensors(eager)
        if k <= 3:
            assert all(torch.equal(ref[key].float(), now[key].float()) for key in ref), k
        else:  # fused AdamW after a found_inf skip: the same update within one fp32 ulp (measured)
            diffs = max_diffs(ref, now)
            assert all(v <= IMPL_TOL for v in diffs.values()), diffs
    assert int(graphed.step.opt_f.state[next(graphed.step.drift.parameters())]["step"]) == 4


def test_the_graphed_step_checkpoints_its_learning_rates_as_numbers():
    graphed = GraphedAGMStep(make("fused"))
    graphed(*batches(1)[0], 0)
    lr = graphed.step.opt_f.param_groups[0]["lr"]
    with graphed.host_lr():
        json.dumps(graphed.step.opt_f.state_dict()["param_groups"])  # state.json is JSON
        assert graphed.step.opt_f.param_groups[0]["lr"] == pytest.approx(lr.item())
    assert graphed.step.opt_f.param_groups[0]["lr"] is lr


def test_the_graphed_step_refuses_a_non_fused_optimiser():
    with pytest.raises(ConfigError, match="optim.impl=fused"):
        GraphedAGMStep(make("foreach"))


@needs_cuda
def test_the_captured_step_replays_like_the_eager_step_on_cuda():
    """On CUDA: the step captured once and replayed (train.kernels=torch; weights.scheme=uniform,
    as the reference weights read the spread of V on the host) against AGMStep with fused AdamW,
    a NaN step included; capturable AdamW."""
    dev = torch.device("cuda")
    cfg = make_cfg("weights.scheme=uniform", "train.device=cuda")

    def build():
        torch.manual_seed(0)
        drift, potential = Drift().to(dev), Potential().to(dev)
        ema = copy.deepcopy(drift).eval().requires_grad_(False)
        opt_f, opt_v = build_optimisers(cfg, drift, potential, "fused", capturable=True)
        return AGMStep(cfg, drift, potential, ema, opt_f, opt_v, device=dev, kernels="torch", autocast_dtype=None)

    eager, graphed = build(), GraphedAGMStep(build())
    for k, (idx, x1) in enumerate(batches(5, nan_at=2)):
        de, dg = eager(idx.to(dev), x1.to(dev), k), graphed(idx.to(dev), x1.to(dev), k)
        assert bool(de["finite"]) == bool(dg["finite"]) == (k != 2)
        if k != 2:
            assert dg["loss_f"].item() == pytest.approx(de["loss_f"].item(), rel=1e-5)
    a, b = tensors(eager), tensors(graphed.step)
    for key in a:
        torch.testing.assert_close(b[key].float().cpu(), a[key].float().cpu(), rtol=1e-5, atol=1e-6)
    assert graphed.graph is not None


# ----------------------------------------------------------------------------- the trainer's wiring

TINY = ["data.resolution=8", "data.num_images=16", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attn_resolutions=[]", "model.num_heads=2", "potential.channels=[4,8,8]", "train.batch_size=4",
        "train.sample_every=0", "train.eval_images=0", "train.progress=false", "train.log_every=1000",
        "train.ckpt_every=0", "sample.steps=10", "bridge.t_eps=0.01", "train.device=cpu", "train.kernels=torch"]


def test_the_trainer_builds_the_chosen_adamw_and_resumes_a_checkpoint_under_another(tmp_path):
    """optim.impl reaches both optimisers and run_info.json; a run written with foreach resumes
    with fused (the trainer re-applies its own implementation to the loaded param groups)."""
    from agm_fast.trainer import Trainer
    run_dir = tmp_path / "run"
    first = Trainer(config.load("demo32", TINY + [f"train.run_dir={run_dir}", "train.steps=2", "optim.impl=foreach"]))
    assert all(g["foreach"] and not g["fused"] for o in (first.opt_f, first.opt_v) for g in o.param_groups)
    first.run()
    info = json.loads((run_dir / "run_info.json").read_text())["implementations"]
    assert (info["optim.impl"], info["train.compile"], info["train.cuda_graph"]) == ("foreach", "off", False)
    second = Trainer(config.load("demo32", TINY + [f"train.run_dir={run_dir}", "train.steps=3", "optim.impl=fused"]))
    assert second.step == 2
    assert all(g["fused"] and not g["foreach"] for o in (second.opt_f, second.opt_v) for g in o.param_groups)
    assert int(second.opt_f.state[next(second.drift.parameters())]["step"]) == 2
    assert second.run()["step"] == 3


def test_the_trainer_runs_channels_last_and_checkpointing_like_the_plain_net(tmp_path):
    """model.channels_last and model.checkpointing reach the drift net and its EMA copy, the batch
    enters the step as NHWC, and four steps give the plain run's losses and weights (fp32 rounding:
    NHWC convolutions sum in another order; checkpointing recomputes the same ops)."""
    from agm_fast.trainer import Trainer
    seen = []
    runs = {}
    for name, extra in (("plain", ["model.channels_last=false"]),  # demo32 itself runs NHWC
                        ("fast", ["model.channels_last=true", "model.checkpointing=true"])):
        tr = Trainer(config.load("demo32", TINY + [f"train.run_dir={tmp_path / name}", "train.steps=4"] + extra))
        if name == "fast":
            assert tr.drift.channels_last and tr.drift.checkpointing and tr.ema.channels_last
            forward = tr.drift.forward

            def spy(x, t):
                seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
                return forward(x, t)
            tr.drift.forward = spy
        tr.run()
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (torch.tensor([[r["loss_f"], r["loss_v"]] for r in rows if "loss_f" in r]),
                      torch.cat([p.detach().reshape(-1) for p in tr.drift.parameters()]))
    assert seen and all(seen)  # x_t reaches the net as NHWC: the step converted the batch once
    (loss_a, w_a), (loss_b, w_b) = runs["plain"], runs["fast"]
    assert loss_a.shape == (4, 2)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert (w_b - w_a).abs().max() <= 1e-5 * w_a.abs().max()
