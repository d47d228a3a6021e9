"""Evaluation during training (train.eval_every): eval rows in metrics.jsonl at the right steps,
kept on resume, drawn in loss.png; a signal during an evaluation still checkpoints; off by default."""

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from agm_fast import features, plots
from agm_fast.trainer import Trainer
from test_trainer import read_metrics, tiny

# 2 EM steps (t_eps ≤ 1/2) and N = 8: each evaluation is a few EffLite0 batches of 8 images
FAST = ["sample.steps=2", "bridge.t_eps=0.5", "train.eval_n=8", "train.eval_every=1", "train.ckpt_every=1"]


def _split(run_dir):
    rows = read_metrics(run_dir)
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def _png_height(path) -> int:
    from PIL import Image
    with Image.open(path) as im:
        return im.size[1]


def test_eval_rows_appear_survive_resume_and_are_plotted(tmp_path, monkeypatch):
    ok, why = features.efflite0_available()
    if not ok:
        pytest.skip(f"EfficientNet-Lite0 weights not installed: {why}")
    monkeypatch.setenv("AGM_FAST_CACHE", str(tmp_path / "cache"))
    cfg = tiny(tmp_path, "train.steps=2", *FAST)
    Trainer(cfg).run()
    run = Path(cfg.train.run_dir)
    losses, evals = _split(run)
    assert [r["step"] for r in losses] == [0, 1]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        e = r["eval"]
        assert "FID" not in e and e["n"] == 8 and e["n_real"] == 8 and e["seconds"] > 0
        for key in ("FD-EffLite0", "kid_mean", "swd"):
            assert math.isfinite(e[key]), (key, e)
        assert e["FD-EffLite0"] >= 0 and e["swd"] > 0
    assert list(plots.eval_series(read_metrics(run))) == ["FD-EffLite0", "kid_mean", "swd"]
    assert _png_height(run / "loss.png") > 6.5 * 90  # the eval panel row below the four loss panels

    # a run killed during the evaluation at step 2 (no row) after logging past its checkpoint:
    # the resume drops what lies beyond step 2, keeps the eval row at 1, evaluates step 2 again
    # (here without the EffLite0 weights, to keep the test short: SWD-only rows from then on)
    monkeypatch.setattr(features, "efflite0_available", lambda: (False, "not in this test"))
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] != 2]
    lines += [json.dumps({**losses[-1], "step": 2}), json.dumps({"step": 3, "eval": {"swd": 9.0, "n": 8}})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    Trainer(tiny(tmp_path, "train.steps=3", *FAST)).run()
    losses2, evals2 = _split(run)
    assert [r["step"] for r in losses2] == [0, 1, 2]
    assert [r["step"] for r in evals2] == [1, 2, 3]
    assert evals2[0] == evals[0]
    assert evals2[1]["eval"]["swd"] == pytest.approx(evals[1]["eval"]["swd"], rel=1e-6)  # the same weights
    assert evals2[2]["eval"]["swd"] != 9.0


def test_without_efflite0_weights_swd_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(features, "efflite0_available", lambda: (False, "no efflite0 weights here"))
    cfg = tiny(tmp_path, "train.steps=2", *FAST, "train.ckpt_every=0")
    with caplog.at_level("WARNING", logger="agm_fast"):
        Trainer(cfg).run()
    _, evals = _split(cfg.train.run_dir)
    assert [r["step"] for r in evals] == [1, 2]
    assert all(set(r["eval"]) == {"swd", "n", "n_real", "seconds"} and r["eval"]["swd"] > 0 for r in evals)
    assert sum("no efflite0 weights here" in r.message for r in caplog.records) == 1  # logged once
    assert list(plots.eval_series(read_metrics(cfg.train.run_dir))) == ["swd"]


def test_eval_every_0_writes_no_eval_rows(tmp_path):
    cfg = tiny(tmp_path, "train.steps=2", "sample.steps=2", "bridge.t_eps=0.5")
    assert cfg.train.eval_every == 0
    Trainer(cfg).run()
    rows = read_metrics(cfg.train.run_dir)
    assert [r["step"] for r in rows] == [0, 1] and not any("eval" in r for r in rows)
    assert _png_height(Path(cfg.train.run_dir) / "loss.png") == int(6.5 * 90)  # the four loss panels only


def test_signal_during_an_evaluation_checkpoints_and_exits(tmp_path, monkeypatch):
    tr = Trainer(tiny(tmp_path, "train.steps=3", *FAST))
    finished = []

    def slow_evaluation():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # minutes at a real N; the signal must cut it short
        finished.append(True)
    monkeypatch.setattr(tr, "evaluate_periodic", slow_evaluation)
    result = tr.run()
    assert not finished
    assert result["stopped_by"] == "SIGTERM" and result["step"] == 1
    assert result["checkpoint"].endswith("ckpt-00000001")
    assert not any("eval" in r for r in read_metrics(tr.run_dir))
    assert signal.getsignal(signal.SIGTERM) is not tr._on_signal
