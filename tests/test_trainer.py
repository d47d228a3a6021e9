"""Training end to end on CPU: loss goes down, AGM and baseline, accumulation, exact resume
after SIGKILL, SIGTERM, the non-finite guard, stop-gradient, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agm_fast import config, dispatch
from agm_fast.checkpoint import CheckpointError
from agm_fast.trainer import Trainer, TrainingError
from conftest import wait_for_lines

TINY = ["data.resolution=16", "data.num_images=32", "model.channels=8", "model.channel_mult=[1,2]",
        "model.attn_resolutions=[8]", "model.num_heads=2", "potential.channels=[4,8,8]",
        "train.batch_size=8", "train.sample_every=0", "train.eval_images=0", "train.progress=false",
        "train.deterministic=true", "train.log_every=1000", "sample.steps=10", "bridge.t_eps=0.01",
        "optim.warmup_steps=2", "ema.halflife_kimg=0.05"]


def tiny(tmp_path, *overrides, name="run"):
    return config.load("demo32", TINY + [f"train.run_dir={tmp_path / name}", *overrides])


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_drives_the_drift_loss_down(tmp_path):
    cfg = tiny(tmp_path, "train.steps=80", "bridge.sigma=0", "optim.lr=3e-3", "data.num_images=8",
               "train.sample_every=40")
    Trainer(cfg).run()
    rows = read_metrics(cfg.train.run_dir)
    assert [r["step"] for r in rows] == list(range(80))
    first = sum(r["loss_f"] for r in rows[:10]) / 10
    last = sum(r["loss_f"] for r in rows[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    run = Path(cfg.train.run_dir)
    for f in ("config.json", "run_info.json", "loss.png", "samples.png"):
        assert (run / f).exists(), f
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert ckpt.name == "ckpt-00000080"
    assert {p.name for p in ckpt.iterdir()} == {"drift.safetensors", "potential.safetensors", "ema.safetensors",
                                                "optim.safetensors", "state.json"}


@pytest.mark.parametrize("scheme", ["softmax", "uniform"])
def test_agm_and_baseline_both_run(tmp_path, scheme):
    cfg = tiny(tmp_path, "train.steps=4", f"weights.scheme={scheme}")
    Trainer(cfg).run()
    rows = read_metrics(cfg.train.run_dir)
    assert len(rows) == 4 and all(r["finite"] for r in rows)
    for r in rows:
        for key in ("loss_f", "loss_v", "ess", "w_min", "w_max", "w_per_t_bin", "v_gap", "hinge_active",
                    "grad_norm_f", "grad_norm_v", "img_per_s"):
            assert key in r
        if scheme == "uniform":
            assert r["w_min"] == r["w_max"] == 1.0 and r["ess"] == pytest.approx(8)
    if scheme == "softmax":
        assert any(r["w_max"] > r["w_min"] for r in rows)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    a = Trainer(tiny(tmp_path, "train.steps=3", name="a"))
    a.run()
    b = Trainer(tiny(tmp_path, "train.steps=3", "train.micro_batch=4", name="b"))
    b.run()
    la, lb = read_metrics(a.cfg.train.run_dir), read_metrics(b.cfg.train.run_dir)
    for ra, rb in zip(la, lb):
        assert rb["loss_f"] == pytest.approx(ra["loss_f"], rel=1e-5)
        assert rb["loss_v"] == pytest.approx(ra["loss_v"], rel=1e-5)
    # one step from the same weights: the accumulated gradients equal the big batch's
    a1 = Trainer(tiny(tmp_path, "train.steps=1", name="a1"))
    b1 = Trainer(tiny(tmp_path, "train.steps=1", "train.micro_batch=2", name="b1"))
    step, idx, x1 = next(iter(a1.loader))
    a1.agm_step(idx, x1, step)
    b1.agm_step(idx, x1, step)
    for net in ("drift", "potential"):
        # fp32 sums in another order (2 micro-batches vs 1 batch): an absolute floor relative to the
        # net's largest gradient, as elements near 0 (e.g. biases GroupNorm cancels) carry the
        # rounding of big terms
        scale = max(float(p.grad.abs().max()) for p in getattr(a1, net).parameters())
        for pa, pb in zip(getattr(a1, net).parameters(), getattr(b1, net).parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-5 * scale)


def test_drift_loss_never_reaches_the_potential(tmp_path):
    tr = Trainer(tiny(tmp_path, "train.steps=1"))
    x1 = torch.rand(8, 3, 16, 16) * 2 - 1
    idx, t = torch.arange(8), torch.rand(8) * 0.9
    xt = dispatch.bridge_sample("torch", x1, t, seed=0, step=0, sample_index=idx, sigma=0.5)
    v = tr.potential(xt, t)  # deliberately NOT detached: the loss must stop the gradient itself
    out = dispatch.weighted_bridge_loss("torch", tr.drift(xt, t), x1, t, v, seed=0, step=0, sample_index=idx,
                                        sigma=0.5, predicts="drift", scheme="softmax", favour="coherent", tau=1.0,
                                        clip=2.0)
    out.loss.backward()
    assert all(p.grad is None for p in tr.potential.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.drift.parameters())


def test_triton_and_torch_kernels_train_alike(tmp_path):
    from conftest import skip_unless_available
    from agm_fast import kernels
    skip_unless_available("triton", kernels.interpreter_active() or torch.cuda.is_available(),
                          "needs CUDA or TRITON_INTERPRET=1")
    a = Trainer(tiny(tmp_path, "train.steps=3", "train.kernels=torch", name="torch"))
    a.run()
    b = Trainer(tiny(tmp_path, "train.steps=3", "train.kernels=triton", name="triton"))
    b.run()
    for ra, rb in zip(read_metrics(a.cfg.train.run_dir), read_metrics(b.cfg.train.run_dir)):
        assert rb["loss_f"] == pytest.approx(ra["loss_f"], rel=1e-4)
        assert rb["loss_v"] == pytest.approx(ra["loss_v"], rel=1e-4)


# ----------------------------------------------------------------------------- resume

def _cli(run_dir, steps, extra=()):
    args = [sys.executable, "-m", "agm_fast.cli", "train", "--preset", "demo32"]
    for o in TINY + [f"train.run_dir={run_dir}", f"train.steps={steps}", "train.ckpt_every=5", *extra]:
        args += ["--set", o]
    return args


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_exactly(tmp_path, sig):
    steps = 40
    ref = tiny(tmp_path, f"train.steps={steps}", "train.ckpt_every=5", name="ref")
    Trainer(ref).run()
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lines(run / "metrics.jsonl", 12, proc)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert rc == 0, proc.stderr.read().decode()[-2000:]
        assert b"SIGTERM received" in proc.stderr.read()
    else:
        assert rc == -signal.SIGKILL
    done = read_metrics(run)
    assert len(done) < steps, "the run finished before it was killed; the test proves nothing"
    resumed = subprocess.run(_cli(run, steps), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    a, b = read_metrics(ref.train.run_dir), read_metrics(run)
    assert [r["step"] for r in b] == list(range(steps))
    for ra, rb in zip(a, b):
        assert (ra["loss_f"], ra["loss_v"]) == (rb["loss_f"], rb["loss_v"]), ra["step"]


def test_sigterm_to_the_whole_process_group_with_loader_workers_saves(tmp_path):
    """torchrun and a terminal signal the whole process group: the DataLoader's worker processes
    get the SIGTERM too. They ignore it, so the trainer checkpoints and exits 0 instead of dying
    with "DataLoader worker killed by signal"."""
    import os
    run = tmp_path / "group"
    proc = subprocess.Popen(_cli(run, 400, ["data.loader=torch", "data.workers=2"]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    wait_for_lines(run / "metrics.jsonl", 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert rc == 0 and "SIGTERM received" in err, err[-2000:]
    done = len(read_metrics(run))
    assert done < 400 and (run / "checkpoints" / f"ckpt-{done:08d}" / "state.json").exists()


# ----------------------------------------------------------------------------- robustness

def test_nonfinite_losses_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "train.steps=20", "train.ckpt_every=4", "train.max_nonfinite=2")
    tr = Trainer(cfg)
    real = dispatch.weighted_bridge_loss

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        return out._replace(loss=out.loss * float("nan")) if kw["step"] >= 5 else out
    monkeypatch.setattr(dispatch, "weighted_bridge_loss", poisoned)
    with pytest.raises(TrainingError, match=r"stopping at step 7: 3 non-finite losses exceed "
                                            r"train.max_nonfinite=2; last good checkpoint: .*ckpt-00000004"):
        tr.run()
    rows = read_metrics(cfg.train.run_dir)
    assert [r["finite"] for r in rows] == [True] * 5 + [False] * 3
    ckpts = sorted((Path(cfg.train.run_dir) / "checkpoints").iterdir())
    assert ckpts[-1].name == "ckpt-00000004"
    monkeypatch.setattr(dispatch, "weighted_bridge_loss", real)
    again = Trainer(cfg)  # the last good checkpoint is intact and resumes
    assert again.step == 4


def test_diverged_weights_are_never_checkpointed(tmp_path):
    """Finite losses can still leave non-finite weights (a huge step): the save refuses them and
    names the last good checkpoint, which stays the newest."""
    tr = Trainer(tiny(tmp_path, "train.steps=2"))
    tr.run()
    with torch.no_grad():
        next(tr.drift.parameters()).view(-1)[0] = float("inf")
    tr.step = 3
    with pytest.raises(TrainingError, match=r"step 3: the drift weights hold NaN/Inf .*last good checkpoint: "
                                            r".*ckpt-00000002"):
        tr.save_checkpoint()
    assert [p.name for p in (Path(tr.run_dir) / "checkpoints").iterdir()] == ["ckpt-00000002"]


def test_folder_evaluation_uses_a_seeded_random_subset(tmp_path, monkeypatch):
    """metrics.json's reference images for a folder: not the first files in sorted order (often one
    class or source), the same subset for the same seed."""
    from PIL import Image

    from agm_fast import metrics
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):  # image i is the constant grey level 20·i: which images were used is visible
        Image.new("RGB", (16, 16), (20 * i,) * 3).save(folder / f"{i:02d}.png")
    refs = []

    def record(images, ref, *args, **kw):
        refs.append(ref)
        return 0.0
    monkeypatch.setattr(metrics, "sliced_wasserstein", record)
    cfg = tiny(tmp_path, "train.steps=1", "data.dataset=folder", f"data.path={folder}", "train.eval_images=4",
               "sample.steps=2", "bridge.t_eps=0.5")
    Trainer(cfg).run()
    levels = sorted(round(float((img[0, 0, 0] + 1) * 127.5) / 20) for img in refs[0])
    assert len(levels) == 4 and len(set(levels)) == 4 and levels != [0, 1, 2, 3], levels
    assert torch.equal(refs[0], refs[1])  # trained and untrained nets are scored on the same images
    result = json.loads((Path(cfg.train.run_dir) / "metrics.json").read_text())
    assert result["reference_images"] == "4 training images, a seeded random subset (no held-out split)"


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    Trainer(tiny(tmp_path, "train.steps=2")).run()
    with pytest.raises(CheckpointError, match=r"drift net architecture differs from this config \(channels: 8 there vs 16 here"
                                            r".*another train.run_dir or --no-resume"):
        Trainer(tiny(tmp_path, "train.steps=4", "model.channels=16"))


def test_fine_tune_from_a_run(tmp_path):
    base = Trainer(tiny(tmp_path, "train.steps=3", name="base"))
    base.run()
    ft = Trainer(tiny(tmp_path, "train.steps=2", f"train.init_from={tmp_path / 'base'}", name="ft"))
    assert ft.step == 0
    for a, b in zip(ft.ema.parameters(), base.ema.parameters()):
        assert torch.equal(a, b)
    ft.run()


def test_fine_tune_from_an_ema_file(tmp_path):
    base = Trainer(tiny(tmp_path, "train.steps=2", name="base"))
    base.run()
    ema = base.latest_checkpoint() / "ema.safetensors"
    ft = Trainer(tiny(tmp_path, "train.steps=1", f"train.init_from={ema}", name="ft"))
    assert ft.step == 0
    for a, b, c in zip(ft.drift.parameters(), ft.ema.parameters(), base.ema.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)
    with pytest.raises(CheckpointError, match=r"drift net architecture differs.*channels: 8 there vs 16 here"):
        Trainer(tiny(tmp_path, "train.steps=1", f"train.init_from={ema}", "model.channels=16", name="ft16"))


def test_no_resume_sets_the_previous_run_aside(tmp_path):
    old = tiny(tmp_path, "train.steps=6", "train.ckpt_every=2")
    Trainer(old).run()
    new = tiny(tmp_path, "train.steps=3", "train.ckpt_every=1")
    Trainer(new, resume=False).run()
    run = Path(new.train.run_dir)
    # the old run's later ckpt-6 must neither prune the new checkpoints nor be taken for them
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002", "ckpt-00000003"]
    again = Trainer(new)
    assert again.step == 3 and again.latest_checkpoint().name == "ckpt-00000003"
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    (aside,) = run.glob("replaced-*")  # moved, not deleted
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["ckpt-00000004", "ckpt-00000006"]
    assert len(read_metrics(aside)) == 6


def test_folder_dataset_is_used_whole(tmp_path):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(folder / f"{i}.png")
    # data.num_images sizes the procedural set; it must not cap a folder (celeba64 left it at 20000)
    tr = Trainer(tiny(tmp_path, "data.dataset=folder", f"data.path={folder}", "data.num_images=2"))
    assert len(tr.dataset) == 5


def test_signal_during_the_final_evaluation_stops_at_once(tmp_path, monkeypatch):
    import os
    cfg = tiny(tmp_path, "train.steps=2", "train.eval_images=4")
    tr = Trainer(cfg)
    finished = []

    def slow_evaluate(last):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # minutes in the demo; the signal must cut it short
        finished.append(True)
    monkeypatch.setattr(tr, "evaluate", slow_evaluate)
    result = tr.run()
    assert not finished
    assert result["stopped_by"] == "SIGINT" and result["step"] == 2
    assert result["checkpoint"].endswith("ckpt-00000002")


def test_log_lines_reach_the_log_with_the_progress_bar_on(tmp_path):
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("agm_fast")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        Trainer(tiny(tmp_path, "train.steps=4", "train.progress=true", "train.log_every=2")).run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    steps = [r.getMessage().split()[1] for r in records if r.getMessage().startswith("step ")]
    assert steps == ["2", "4"]


def test_a_saved_step_is_not_rewritten(tmp_path):
    # rewriting meant rmtree + rename: a kill in between left no checkpoint at that step
    tr = Trainer(tiny(tmp_path, "train.steps=2"))
    tr.run()
    ckpt = tr.latest_checkpoint()
    before = (ckpt / "state.json").stat().st_ino
    assert tr.save_checkpoint() == ckpt
    assert (ckpt / "state.json").stat().st_ino == before


def test_sample_settings_fail_before_training(tmp_path, monkeypatch):
    from agm_fast.config import ConfigError
    with pytest.raises(ConfigError, match="sample.cuda_graph"):
        Trainer(tiny(tmp_path, "train.steps=1", "train.sample_every=1", "sample.cuda_graph=true"))
    monkeypatch.setattr(dispatch, "_ext_status", lambda device: (False, "agm_fast._C is not built"))
    with pytest.raises(ConfigError, match="sample.em=ext .*not built"):
        Trainer(tiny(tmp_path, "train.steps=1", "train.sample_every=1", "sample.em=ext"))


def test_cli_ctrl_c_while_sampling_is_one_line(tmp_path, capsys, monkeypatch):
    from agm_fast import sampler
    from agm_fast.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sampler, "sample_from_checkpoint", interrupted)
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "agm-fast sample: interrupted", err


@pytest.mark.parametrize("override,match", [
    ("data.dataset=folder", "data.path"),
    ("model.attention=flash", "model.attention='flash' is not allowed"),
    ("train.kernels=cuda", "train.kernels='cuda' is not allowed"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, override, match):
    from agm_fast.cli import main
    rc = main(["train", "--set", f"train.run_dir={tmp_path}", "--set", override])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, match)


def assert_one_error_line(err: str, match: str) -> None:
    """Exactly one error line naming the problem (log lines may precede it), no traceback."""
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in err, err


def test_cli_missing_and_empty_dataset_folder(tmp_path, capsys):
    from agm_fast.cli import main
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        rc = main(["train", "--set", f"train.run_dir={tmp_path / 'r'}", "--set", "data.dataset=folder",
                   "--set", f"data.path={folder}"])
        assert rc == 2
        assert_one_error_line(capsys.readouterr().err, str(folder))


def test_cli_sample_and_info(tmp_path, capsys):
    from agm_fast.cli import main
    cfg = tiny(tmp_path, "train.steps=2")
    Trainer(cfg).run()
    out = tmp_path / "grid.png"
    assert main(["sample", cfg.train.run_dir, "--n", "4", "--steps", "10", "--out", str(out),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    assert out.exists() and (tmp_path / "s.npz").exists()
    assert main(["sample", cfg.train.run_dir, "--n", "4", "--sigma", "0.3", "--out", str(out)]) == 2
    assert "sigma" in capsys.readouterr().err
    assert main(["info", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "train.kernels" in text and "sample.em" in text and "model.attention" in text


def test_damaged_checkpoint_and_half_written_save(tmp_path):
    cfg = tiny(tmp_path, "train.steps=2")
    Trainer(cfg).run()
    ckpt = Trainer(cfg).latest_checkpoint()
    # a save killed before its rename is never taken, neither to resume nor to fine-tune from
    shutil.copytree(ckpt, ckpt.with_name("ckpt-99999999.tmp"))
    assert Trainer(cfg).latest_checkpoint() == ckpt
    ft = Trainer(tiny(tmp_path, "train.steps=1", f"train.init_from={cfg.train.run_dir}", name="ft"))
    assert ft.step == 0
    (ckpt / "drift.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"drift.safetensors: cannot be loaded"):
        Trainer(cfg)


def test_sampling_grid_outside_the_trained_range_fails_before_training(tmp_path):
    from agm_fast.config import ConfigError
    with pytest.raises(ConfigError, match=r"t_min=0.1.*train.sample_every=0"):
        Trainer(tiny(tmp_path, "train.steps=2", "bridge.t_min=0.1", "train.sample_every=1"))
    Trainer(tiny(tmp_path, "train.steps=1", "bridge.t_min=0.1", name="nosample")).run()  # no sampling: fine


def test_the_loader_delivers_on_the_training_device(tmp_path):
    # the trainer once passed pin_memory but not its device: pinning was always off and the
    # non-blocking copy went nowhere; the loader now copies to the trainer's device itself
    tr = Trainer(tiny(tmp_path, "train.steps=1", "data.loader=torch"))
    assert tr.loader.device == tr.device
    step, idx, x1 = next(iter(tr.loader))
    assert x1.device == tr.device and step == 0 and idx.shape == (tr.cfg.train.batch_size,)
    assert tr.loader.pin_memory == (tr.device.type == "cuda")
