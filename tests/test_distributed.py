"""Multi-process training with torchrun and DistributedDataParallel, on the CPU (gloo), issue 13.

Real launches (`python -m torch.distributed.run --standalone --nproc_per_node 2 ...`) of a tiny
config, each a few seconds of training after ~8 s of start-up, compared with one process run in
this test process:

- 2 ranks × 4 images give *bitwise* the same losses, diagnostics, weights, EMA and optimiser
  state as one process with the global batch 8 and train.micro_batch=4: each rank's forward and
  backward is that micro-batch's, the per-rank normaliser (4 instead of 8) and DDP's division by
  the world size are powers of two, and a sum of two gradients does not depend on its order.
- Against one process with the whole batch in one forward (or with other micro-batches) only the
  fp32 reduction order differs, exactly as it does for micro-batching in one process
  (tests/test_trainer.py; measured: the same differences to the last digit). Over 4 steps the
  losses agree to rel 1e-5 (measured ≤ 2.3e-6), grad norms, V gap, ESS and weights to rel 1e-4
  (measured ≤ 2.8e-5), Adam's moments to 1e-4 of the net's largest moment.
  The drift, EMA drift and potential compute the same function: outputs on a fixed batch agree
  to 1e-4 of their largest value. Single weights are not compared with a tolerance: where a
  gradient is rounding noise (a bias in front of a GroupNorm, 0 in exact arithmetic) Adam
  normalises that noise into steps of ±lr in either run (measured: such a bias 1.3e-3 apart after
  4 steps at lr 5e-4), in directions the GroupNorm cancels.
- Resume across world sizes (2 → 1 and 1 → 2), exact resume after SIGTERM, SIGTERM to the
  launcher and to a single worker, a failing rank, the Triton kernels (v_offset) under DDP, and
  identical EMA / potential / optimiser states on every rank (hashes written by each rank).

The launches run a small wrapper of agm_fast.cli (written into the test's tmp dir) that records
each rank's pid and a hash of every parameter and optimiser tensor, and that can make one rank
raise. AGM_FAST_DIST_TIMEOUT bounds every collective, so nothing here can hang for long.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import agm_fast
from agm_fast import config, distributed
from agm_fast.config import ConfigError
from agm_fast.trainer import Trainer
from conftest import wait_for_lines

ROOT = Path(agm_fast.__file__).resolve().parent.parent
TINY = ["data.resolution=16", "data.num_images=32", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attn_resolutions=[8]", "model.num_heads=2", "potential.channels=[4,8,8]",
        "train.batch_size=8", "train.sample_every=0", "train.eval_images=0", "train.progress=false",
        "train.deterministic=true", "train.log_every=1000", "sample.steps=10", "bridge.t_eps=0.01",
        "optim.warmup_steps=2", "ema.halflife_kimg=0.05", "train.threads=1", "train.kernels=torch"]
STEPS = 4
LOSS_RTOL = 1e-5      # L_f, L_V, unweighted MSE: fp32 reduction order
WEIGHT_RTOL = 1e-4    # grad norms, V gap, ESS, weights: standardising V (std ≈ 1e-3 early on) and the
                      # Adam steps of noise-level gradients (module docstring) magnify the rounding
MOMENT_RTOL = 1e-4    # Adam moments, relative to the net's largest
OUTPUT_RTOL = 1e-4    # the nets' outputs on a fixed batch, relative to their largest
DIAG = ("loss_f", "loss_v", "grad_norm_f", "grad_norm_v", "v_gap", "hinge_active", "mse_unweighted",
        "ess", "w_min", "w_max")
LOSSES = ("loss_f", "loss_v", "mse_unweighted")
LAUNCH_TIMEOUT = 120  # s, a loaded 2-core machine; a launch takes ~10-20 s

PROBE = '''
"""Test-only wrapper of agm_fast.cli (tests/test_distributed.py): pid file per rank, a hash of
every parameter and optimiser tensor per rank after the run, and a rank that raises on request."""
import hashlib, json, os, sys
import torch
from agm_fast import cli, step as step_mod, trainer

out, rank = os.environ["AGM_PROBE_DIR"], int(os.environ.get("RANK", "0"))
with open(os.path.join(out, f"pid-{rank}"), "w") as f:
    f.write(str(os.getpid()))
if os.environ.get("AGM_PROBE_RAISE"):  # "rank:step"
    bad_rank, bad_step = map(int, os.environ["AGM_PROBE_RAISE"].split(":"))
    real_call = step_mod.AGMStep.__call__
    def call(self, indices, x1, k):
        if self.rank == bad_rank and k == bad_step:
            raise RuntimeError(f"probe: rank {bad_rank} fails at step {bad_step}")
        return real_call(self, indices, x1, k)
    step_mod.AGMStep.__call__ = call
if os.environ.get("AGM_PROBE_NAN"):  # "rank:step": that rank's L_f is NaN, its gradients stay finite
    from agm_fast import dispatch
    nan_rank, nan_step = map(int, os.environ["AGM_PROBE_NAN"].split(":"))
    real_loss = dispatch.weighted_bridge_loss
    def poisoned(*args, **kw):
        out = real_loss(*args, **kw)
        if rank == nan_rank and kw["step"] == nan_step:
            out = out._replace(loss=out.loss + torch.tensor(float("nan"), device=out.loss.device))
        return out
    dispatch.weighted_bridge_loss = poisoned

real_run = trainer.Trainer.run
def run(self):
    result = real_run(self)
    tensors = {}
    for name in ("drift", "potential", "ema"):
        for k, v in getattr(self, name).state_dict().items():
            tensors[f"{name}.{k}"] = v
    for name in ("opt_f", "opt_v"):
        for i, st in getattr(self, name).state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"{name}.{i}.{k}"] = torch.as_tensor(v)
    digest = {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
              for k, v in tensors.items()}
    with open(os.path.join(out, f"digest-{rank}.json"), "w") as f:
        json.dump({"step": self.step, "tensors": digest}, f)
    return result
trainer.Trainer.run = run
sys.exit(cli.main(sys.argv[1:]))
'''

LAUNCHES: list[tuple[str, int, str]] = []  # (what, launcher exit status, stderr) of every launch


def overrides(run_dir, *extra):
    return TINY + [f"train.run_dir={run_dir}", f"train.steps={STEPS}", *extra]


def tiny(run_dir, *extra):
    return config.load("demo32", overrides(run_dir, *extra))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def ckpt_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in ("drift", "potential", "ema", "optim"):
        out.update({f"{f}/{k}": v for k, v in load_file(ckpt / f"{f}.safetensors").items()})
    return out


def launch_args(probe_dir: Path, run_dir, *extra, nproc=2):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.2", str(probe_dir / "ddp_probe.py"), "train", "--preset", "demo32"]
    for o in overrides(run_dir, *extra):
        args += ["--set", o]
    return args


def launch_env(probe_dir: Path, **extra) -> dict:
    env = dict(os.environ, AGM_PROBE_DIR=str(probe_dir), AGM_FAST_DIST_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.update(extra)
    return env


def probe_dir(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "ddp_probe.py").write_text(textwrap.dedent(PROBE))
    return tmp


def launch(what, tmp: Path, run_dir, *extra, env=None) -> subprocess.CompletedProcess:
    p = probe_dir(tmp)
    t0 = time.perf_counter()
    out = subprocess.run(launch_args(p, run_dir, *extra), env=env or launch_env(p), capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT)
    LAUNCHES.append((what, out.returncode, out.stderr))
    print(f"launch {what}: {time.perf_counter() - t0:.1f} s, status {out.returncode}")
    return out


def assert_ok(out: subprocess.CompletedProcess):
    assert out.returncode == 0, out.stderr[-4000:]


def max_rel_diff(got: list[dict], ref: list[dict]) -> dict[str, float]:
    """Largest |a − b| / max(|b|, 1e-2) per diagnostic (printed, for the tolerances above)."""
    out = {}
    for a, b in zip(got, ref):
        for k in DIAG:
            out[k] = max(out.get(k, 0.0), abs(a[k] - b[k]) / max(abs(b[k]), 1e-2))
    return out


def assert_rows(got: list[dict], ref: list[dict], rtol: float, *, exact=False, weight_rtol=WEIGHT_RTOL):
    """Every diagnostic of every step: bitwise (exact), else the losses to rtol and the rest
    (grad norms, V gap, ESS, weights) to weight_rtol; absolute below 1e-2 (v_gap starts near 0)."""
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    if not exact:
        print("max relative differences:", {k: f"{v:.1e}" for k, v in max_rel_diff(got, ref).items()})
    for a, b in zip(got, ref):
        for k in DIAG:
            tol = rtol if k in LOSSES else weight_rtol
            if exact:
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
            else:
                assert a[k] == pytest.approx(b[k], rel=tol, abs=tol * 1e-2), (a["step"], k, a[k], b[k])
        assert a["finite"] and b["finite"]
        bins_a, bins_b = a["w_per_t_bin"], b["w_per_t_bin"]
        assert [x is None for x in bins_a] == [y is None for y in bins_b], (a["step"], bins_a, bins_b)
        pairs = [(x, y) for x, y in zip(bins_a, bins_b) if x is not None]
        for x, y in pairs:
            assert x == y if exact else x == pytest.approx(y, rel=weight_rtol), (a["step"], bins_a, bins_b)


def build_nets(tensors: dict) -> dict[str, torch.nn.Module]:
    """The drift, EMA drift and potential of a checkpoint's tensors (ckpt_tensors)."""
    from agm_fast import models
    from agm_fast.checkpoint import drift_arch, potential_arch
    cfg = tiny("unused")
    nets = {"drift": models.DriftUNet(**drift_arch(cfg)), "ema": models.DriftUNet(**drift_arch(cfg)),
            "potential": models.PotentialNet(**potential_arch(cfg))}
    for name, net in nets.items():
        net.load_state_dict({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")})
        net.eval()
    return nets


def assert_states_close(got: dict, ref: dict):
    """As the module docstring says: Adam's moments to MOMENT_RTOL of the net's largest moment, and
    the drift, EMA drift and potential compute the same function to OUTPUT_RTOL of its scale."""
    assert got.keys() == ref.keys()
    measured = {}
    for net in ("drift", "potential"):
        for kind in ("exp_avg", "exp_avg_sq"):
            keys = [k for k in ref if k.startswith(f"optim/{net}.") and k.endswith(f".{kind}")]
            top = max(float(ref[k].abs().max()) for k in keys)
            worst = max(float((got[k] - ref[k]).abs().max()) for k in keys)
            measured[f"{net} {kind}"] = worst / top
            assert worst <= MOMENT_RTOL * top, (net, kind, worst, top)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 3, 16, 16, generator=g), torch.linspace(0.05, 0.95, 8)
    nets_got, nets_ref = build_nets(got), build_nets(ref)
    with torch.no_grad():
        for name in nets_ref:
            a, b = nets_got[name](x, t), nets_ref[name](x, t)
            scale = float(b.abs().max())
            measured[f"{name} output"] = float((a - b).abs().max()) / scale
            assert float((a - b).abs().max()) <= OUTPUT_RTOL * scale, (name, measured[f"{name} output"])
    for name in nets_ref:  # reported, not asserted (module docstring: Adam's steps on noise gradients)
        keys = [k for k in ref if k.startswith(name + "/")]
        measured[f"{name} weights"] = max(float((got[k] - ref[k]).abs().max()) for k in keys)
    print("state differences:", {k: f"{v:.1e}" for k, v in measured.items()})


# ----------------------------------------------------------------------------- one process, shared runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The launches and one-process runs that several tests compare, made once."""
    tmp = tmp_path_factory.mktemp("ddp")
    r = {"tmp": tmp}
    # 2 ranks × 4, checkpoints at steps 2 and 4 (EMA/optimiser hashes per rank from the probe)
    r["ddp"] = tmp / "ddp"
    r["ddp_out"] = launch("2 ranks", tmp / "probe-ddp", r["ddp"], "train.ckpt_every=2")
    # one process, global batch 8: with micro-batches of 4 (= the per-rank batch) and whole
    for name, extra in (("one_micro4", ["train.micro_batch=4"]), ("one", []), ("one_micro2", ["train.micro_batch=2"])):
        Trainer(tiny(tmp / name, "train.ckpt_every=2", *extra)).run()
        r[name] = tmp / name
    return r


def test_two_ranks_equal_one_process_with_the_same_global_batch(runs):
    assert_ok(runs["ddp_out"])
    ddp = read_metrics(runs["ddp"])
    assert len(ddp) == STEPS
    # bitwise: rank r's forward/backward is micro-batch r of the one-process run
    assert_rows(ddp, read_metrics(runs["one_micro4"]), 0, exact=True)
    final = "checkpoints/ckpt-00000004"
    a, b = ckpt_tensors(runs["ddp"] / final), ckpt_tensors(runs["one_micro4"] / final)
    assert all(torch.equal(a[k], b[k]) for k in b)
    # the whole batch in one forward: fp32 reduction order only
    assert_rows(ddp, read_metrics(runs["one"]), LOSS_RTOL)
    assert_states_close(a, ckpt_tensors(runs["one"] / final))
    state = json.loads((runs["ddp"] / final / "state.json").read_text())
    assert state["data_position"]["global_sample"] == STEPS * 8
    assert json.loads((runs["ddp"] / "run_info.json").read_text())["distributed"] == {"world": 2, "backend": "gloo"}


def test_two_ranks_with_micro_batches_equal_one_process(runs):
    out = launch("2 ranks, micro-batches", runs["tmp"] / "probe-micro", runs["tmp"] / "ddp_micro2",
                 "train.micro_batch=2")
    assert_ok(out)
    got = read_metrics(runs["tmp"] / "ddp_micro2")
    final = "checkpoints/ckpt-00000004"
    got_state = ckpt_tensors(runs["tmp"] / "ddp_micro2" / final)
    for ref in ("one", "one_micro2"):  # 2 ranks × 2 micro-batches of 2 vs 1 × 8 and 1 × 4 micro-batches of 2
        assert_rows(got, read_metrics(runs[ref]), LOSS_RTOL)
        assert_states_close(got_state, ckpt_tensors(runs[ref] / final))


def test_ema_potential_and_optimisers_are_identical_on_every_rank(runs):
    assert_ok(runs["ddp_out"])
    d0, d1 = (json.loads((runs["tmp"] / "probe-ddp" / f"digest-{r}.json").read_text()) for r in (0, 1))
    assert d0["step"] == d1["step"] == STEPS
    names = d0["tensors"].keys()
    for prefix in ("drift.", "potential.", "ema.", "opt_f.", "opt_v."):
        assert any(k.startswith(prefix) for k in names), prefix
    assert any(k.endswith("exp_avg_sq") for k in names) and any(k.endswith(".step") for k in names)
    assert d0["tensors"] == d1["tensors"]


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    ddp_rows = read_metrics(runs["ddp"])
    for extra, exact in ((["train.micro_batch=4"], True), ([], False)):
        run = tmp_path / f"resumed{len(extra)}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(runs["ddp"] / "checkpoints" / "ckpt-00000002", run / "checkpoints" / "ckpt-00000002")
        tr = Trainer(tiny(run, *extra))
        assert tr.step == 2
        tr.run()
        assert_rows(read_metrics(run), ddp_rows[2:], LOSS_RTOL, exact=exact)
        final = "checkpoints/ckpt-00000004"
        got, ref = ckpt_tensors(run / final), ckpt_tensors(runs["ddp"] / final)
        if exact:
            assert all(torch.equal(got[k], ref[k]) for k in ref)
        else:
            assert_states_close(got, ref)


def test_a_one_process_checkpoint_resumes_on_two_ranks_with_the_triton_kernels(runs):
    """1 → 2 ranks, and train.kernels=triton under DDP: the fused loss reads the all-gathered V at
    this rank's v_offset (a wrong offset would weight other samples: far outside 1e-4)."""
    from conftest import skip_unless_available
    from agm_fast import kernels
    skip_unless_available("triton", kernels.interpreter_active() or torch.cuda.is_available(),
                          "needs CUDA or TRITON_INTERPRET=1")
    run = runs["tmp"] / "resumed_on_two"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs["one"] / "checkpoints" / "ckpt-00000002", run / "checkpoints" / "ckpt-00000002")
    out = launch("1 → 2 ranks, triton", runs["tmp"] / "probe-triton", run, "train.kernels=triton",
                 "train.micro_batch=2")
    assert_ok(out)
    assert "resumed from" in out.stderr and "ckpt-00000002" in out.stderr
    assert_rows(read_metrics(run), read_metrics(runs["one"])[2:], 1e-4, weight_rtol=1e-3)  # + kernel parity


# ----------------------------------------------------------------------------- signals and failures

def _popen(tmp: Path, run_dir: Path, *extra):
    p = probe_dir(tmp)
    return subprocess.Popen(launch_args(p, run_dir, *extra), env=launch_env(p), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_every_rank_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM to the launcher (torchrun passes it to every worker), then SIGTERM to one worker
    only (the others learn it at the next step's agreement), then the rest: the metrics equal one
    uninterrupted process with the same global batch (micro-batches of the per-rank batch: bitwise)."""
    steps = ["train.steps=30", "train.ckpt_every=100", "train.keep_ckpts=5"]
    run = tmp_path / "run"
    # 1. SIGTERM to the launcher
    proc = _popen(tmp_path / "p1", run, *steps)
    wait_for_lines(run / "metrics.jsonl", 4, proc, LAUNCH_TIMEOUT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    LAUNCHES.append(("SIGTERM to the launcher", proc.returncode, err))
    # torchrun itself exits 1 after a signal (its SignalException); the workers exit 0
    assert "SIGTERM received: checkpoint" in err and "ChildFailedError" not in err, err[-3000:]
    done = read_metrics(run)
    assert len(done) < 30, "the run finished before the signal; the test proves nothing"
    ckpt = run / "checkpoints" / f"ckpt-{len(done):08d}"
    assert sorted(p.name for p in ckpt.iterdir()) == ["drift.safetensors", "ema.safetensors", "optim.safetensors",
                                                       "potential.safetensors", "state.json"]
    # 2. the same command resumes; SIGTERM to rank 1 only
    proc = _popen(tmp_path / "p2", run, *steps)
    wait_for_lines(run / "metrics.jsonl", len(done) + 4, proc, LAUNCH_TIMEOUT)
    os.kill(int((tmp_path / "p2" / "pid-1").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    LAUNCHES.append(("SIGTERM to rank 1", proc.returncode, err))
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM (rank 1) received: checkpoint" in err, err[-3000:]
    second = read_metrics(run)
    assert len(done) < len(second) < 30
    d0, d1 = (json.loads((tmp_path / "p2" / f"digest-{r}.json").read_text()) for r in (0, 1))
    assert d0 == d1 and d0["step"] == len(second)  # both ranks stopped after the same step
    # 3. the rest
    assert_ok(launch("resume to the end", tmp_path / "p3", run, *steps))
    ref = tiny(tmp_path / "ref", *steps, "train.micro_batch=4")
    Trainer(ref).run()
    assert_rows(read_metrics(run), read_metrics(ref.train.run_dir), 0, exact=True)


def test_a_failing_rank_fails_the_job_with_its_error(tmp_path):
    t0 = time.perf_counter()
    p = probe_dir(tmp_path / "p")
    out = subprocess.run(launch_args(p, tmp_path / "run", "train.steps=6"), capture_output=True, text=True,
                         env=launch_env(p, AGM_PROBE_RAISE="1:2"), timeout=LAUNCH_TIMEOUT)
    LAUNCHES.append(("rank 1 raises", out.returncode, out.stderr))
    assert out.returncode != 0
    assert "RuntimeError: probe: rank 1 fails at step 2" in out.stderr, out.stderr[-3000:]
    # torchrun names the first failure: rank 1, with its traceback (the CLI records it for torchrun)
    root = out.stderr[out.stderr.index("Root Cause"):]
    assert "rank      : 1" in root and "probe: rank 1 fails at step 2" in root, root
    assert time.perf_counter() - t0 < LAUNCH_TIMEOUT


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's L_f is NaN at step 1 while every gradient stays finite: rank 0 alone would step.
    The guard decides on every rank's values, so both skip it and stay identical."""
    p = probe_dir(tmp_path / "p")
    out = subprocess.run(launch_args(p, tmp_path / "run", "train.steps=3"), capture_output=True, text=True,
                         env=launch_env(p, AGM_PROBE_NAN="1:1"), timeout=LAUNCH_TIMEOUT)
    LAUNCHES.append(("NaN on rank 1", out.returncode, out.stderr))
    assert_ok(out)
    rows = read_metrics(tmp_path / "run")
    assert [r["finite"] for r in rows] == [True, False, True]
    assert rows[1]["loss_f"] != rows[1]["loss_f"]  # the global L_f is NaN, as one process would log it
    assert "step 1: non-finite loss" in out.stderr
    d0, d1 = (json.loads((p / f"digest-{r}.json").read_text()) for r in (0, 1))
    assert d0 == d1


def test_five_launches_in_a_row_exit_cleanly(runs):
    """Every launch of this file that should succeed exited 0 with no abort at interpreter exit
    (the process group is destroyed on every path); at least five of them."""
    ok = [(what, rc, err) for what, rc, err in LAUNCHES if what not in ("rank 1 raises", "SIGTERM to the launcher")]
    if len(ok) < 5:  # run on its own (-k): make the launches here
        for i in range(5 - len(ok)):
            launch(f"extra {i}", runs["tmp"] / f"probe-extra{i}", runs["tmp"] / f"extra{i}", "train.steps=1")
        ok = [(w, rc, err) for w, rc, err in LAUNCHES if w not in ("rank 1 raises", "SIGTERM to the launcher")]
    assert len(ok) >= 5
    for what, rc, err in ok:
        assert rc == 0, (what, err[-3000:])
        for bad in ("Traceback", "Aborted", "terminate called", "core dumped", "Segmentation fault",
                    "destroy_process_group() was not called"):
            assert bad not in err, (what, bad, err[-3000:])


# ----------------------------------------------------------------------------- in-process

def test_batch_that_does_not_divide_names_the_fields():
    assert distributed.per_rank_batch(12, 0, 2) == (6, 6)
    assert distributed.per_rank_batch(12, 3, 2) == (6, 3)
    with pytest.raises(ConfigError, match=r"train.batch_size=10 is the global batch and must be divisible by "
                                          r"the world size 4"):
        distributed.per_rank_batch(10, 0, 4)
    with pytest.raises(ConfigError, match=r"train.micro_batch=4 must divide the per-rank batch "
                                          r"train.batch_size / world = 12 / 2 = 6"):
        distributed.per_rank_batch(12, 4, 2)


def test_one_process_runs_no_collective(tmp_path, monkeypatch):
    import torch.distributed as dist
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.setup(torch.device("cpu")) is None

    def refuse(*a, **k):
        raise AssertionError("a collective in the single-process path")
    for name in ("all_gather", "all_reduce", "broadcast", "barrier", "broadcast_object_list", "init_process_group"):
        monkeypatch.setattr(dist, name, refuse)
    tr = Trainer(tiny(tmp_path / "one", "train.steps=2", "train.micro_batch=4"))
    assert tr.dist is None and tr.agm_step._drift is tr.drift
    tr.run()
    assert not dist.is_initialized()
