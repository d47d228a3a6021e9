"""studies/agm_vs_drift.py: the whole pipeline in --smoke mode on tiny prepared folders (both
arms, three seeds, two datasets), its outputs, resuming without retraining, and the aggregation
over seeds against numbers worked out by hand."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _study():
    spec = importlib.util.spec_from_file_location("agm_vs_drift", ROOT / "studies" / "agm_vs_drift.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _study()


def _tiny_prepared(data_dir: Path, tmp: Path) -> None:
    """The study's two prepared folders, from 10 random PNGs each, through agm_fast.prepare."""
    from PIL import Image

    from agm_fast import prepare
    rng = np.random.default_rng(0)
    for name, d in S.DATASETS.items():
        src = tmp / f"src-{name}"
        src.mkdir()
        for i in range(10):
            shape = (d["resolution"], d["resolution"]) + ((3,) if d["channels"] == 3 else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(src / f"{i}.png")
        prepare.prepare(src, data_dir / d["folder"], d["resolution"], d["channels"], progress=False)


def _mtimes(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}


def test_smoke_study_outputs_and_resume(tmp_path, monkeypatch, capsys):
    from agm_fast.trainer import Trainer
    monkeypatch.setenv("AGM_FAST_CACHE", str(tmp_path / "cache"))
    # each run's loss.png (tested in test_periodic_eval) took 2/3 of this test's time
    monkeypatch.setattr(Trainer, "write_plot", lambda self: None)
    data, out = tmp_path / "data", tmp_path / "study"
    _tiny_prepared(data, tmp_path)
    argv = ["--out", str(out), "--data-dir", str(data), "--smoke"]
    study = S.main(argv)
    first = capsys.readouterr().out
    n_runs = len(S.DATASETS) * len(S.ARMS) * len(S.SEEDS)
    assert first.count("trained ") == n_runs

    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk == json.loads(json.dumps(study))
    assert on_disk["smoke"] is True and on_disk["seeds"] == [0, 1, 2] and "CPU" in on_disk["device"]
    assert set(on_disk["arms"]) == set(S.DATASETS)
    for ds, arms in on_disk["arms"].items():
        assert set(arms) == {"agm", "drift"}
        for arm, a in arms.items():
            assert a["final_step"] == S.SMOKE["steps"]
            assert sorted(a["per_step"], key=int) == ["1", "2"]
            for key in S.METRICS:
                vals = [a["runs"][str(s)]["evals"]["2"][key] for s in S.SEEDS]
                assert all(isinstance(v, float) and math.isfinite(v) for v in vals)
                assert a["final"][key]["mean"] == pytest.approx(np.mean(vals))
                assert a["final"][key]["std"] == pytest.approx(np.std(vals, ddof=1))
                assert a["final"][key]["n"] == 3
            # the arms differ only in weights.scheme: the same nets, so the same FLOPs as trained
            assert a["flops"]["as_trained"] > a["flops"]["drift_fwd_bwd"] > 0
            assert all(r["wall_s"] > 0 for r in a["runs"].values())
            cfg = json.loads((out / "runs" / ds / arm / "seed1" / "config.json").read_text())
            assert cfg["weights"]["scheme"] == {"agm": "softmax", "drift": "uniform"}[arm]
            assert cfg["train"]["seed"] == 1 and cfg["train"]["steps"] == S.SMOKE["steps"]
            rows = [json.loads(ln) for ln in (out / "runs" / ds / arm / "seed1" / "metrics.jsonl").read_text().splitlines()]
            w = [(r["w_min"], r["w_max"]) for r in rows if "w_min" in r]
            assert len(w) == S.SMOKE["steps"]  # the arm's weights as trained: w ≡ 1 only for drift-only
            assert all(lo == hi == pytest.approx(1.0) for lo, hi in w) == (arm == "drift")
        agm, drift = arms["agm"]["flops"], arms["drift"]["flops"]
        assert agm["as_trained"] == drift["as_trained"]
        assert agm["method"] == drift["method"] + agm["potential_fwd_bwd_pos_neg"]
    table = (out / "study.md").read_text()
    assert table.count("| fashion-mnist |") == 2 + 2 and table.count("| emoji |") == 2 + 2  # + paired rows
    assert set(study["paired"]["emoji"]) == {"agm"} and set(study["paired"]["emoji"]["agm"]) == {"1", "2"}
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: nothing retrained, nothing in the run folders touched
    before = _mtimes(out)
    again = S.main(argv)
    assert capsys.readouterr().out.count("skipped finished ") == n_runs
    assert _mtimes(out) == before
    assert again["arms"] == study["arms"]

    # an interrupted run (no done marker, killed before its last checkpoint) resumes from its checkpoint
    run = out / "runs" / "emoji" / "drift" / "seed2"
    (run / S.DONE_NAME).unlink()
    shutil.rmtree(run / "checkpoints" / "ckpt-00000002")
    S.main(argv)
    log = capsys.readouterr().out
    assert log.count("skipped finished ") == n_runs - 1 and "trained emoji/drift/seed2" in log
    assert "resumed from" in (run / "train.log").read_text()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [1, 2]

    # another configuration in the same --out is refused, naming the run
    with pytest.raises(SystemExit, match="another configuration"):
        S.main(argv[:4])  # the full sizing


def test_mean_std_by_hand():
    r = S.mean_std([1.0, 2.0, 4.0])
    assert r["mean"] == pytest.approx(7 / 3) and r["n"] == 3
    assert r["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert S.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert S.mean_std([None, float("nan")])["n"] == 0


def test_aggregate_arm_by_hand():
    def run(fd4, kid4, swd4, fd2=9.0, wall=10.0):
        ev = lambda fd, kid, swd: {"FD-EffLite0": fd, "kid_mean": kid, "kid_std": 0.01, "swd": swd, "seconds": 1.0}  # noqa: E731
        return {"evals": {"2": ev(fd2, 1.0, 1.0), "4": ev(fd4, kid4, swd4)}, "wall_s": wall,
                "train_s_from_metrics": wall - 2, "eval_s": 2.0}
    runs = {0: run(10.0, 0.2, 0.5, wall=10.0), 1: run(12.0, 0.4, 0.7, wall=14.0),
            2: run(14.0, 0.3, 0.6, fd2=12.0, wall=12.0)}
    runs[2]["evals"]["6"] = runs[2]["evals"]["4"]  # a step only one seed reached is not aggregated
    a = S.aggregate_arm(runs)
    assert a["final_step"] == 4 and list(a["per_step"]) == ["2", "4"]
    assert a["final"]["FD-EffLite0"]["mean"] == pytest.approx(12.0)
    assert a["final"]["FD-EffLite0"]["std"] == pytest.approx(2.0)        # deviations −2, 0, 2; 8/2
    assert a["final"]["kid_mean"]["mean"] == pytest.approx(0.3)
    assert a["final"]["kid_mean"]["std"] == pytest.approx(0.1)           # deviations −.1, .1, 0; .02/2
    assert a["final"]["swd"]["std"] == pytest.approx(0.1)
    assert a["per_step"]["2"]["FD-EffLite0"]["mean"] == pytest.approx(10.0)  # (9 + 9 + 12) / 3
    assert a["per_step"]["2"]["FD-EffLite0"]["std"] == pytest.approx(math.sqrt(3.0))  # (1 + 1 + 4) / 2
    assert a["wall_s"]["mean"] == pytest.approx(12.0) and a["wall_s"]["std"] == pytest.approx(2.0)


def test_paired_differences_by_hand():
    def arm(values):  # FD-EffLite0 at step 4 per seed; the other metrics 0
        runs = {s: {"evals": {"4": {"FD-EffLite0": v, "kid_mean": 0.0, "swd": 0.0}}} for s, v in values.items()}
        return {"per_step": {"4": {}}, "runs": runs}
    p = S.paired_against_baseline(arm({"0": 10.0, "1": 20.0, "2": 30.0}), arm({"0": 12.0, "1": 19.0, "2": 35.0}))
    fd = p["4"]["FD-EffLite0"]
    assert fd["per_seed"] == [-2.0, 1.0, -5.0] and fd["lower_in"] == 2 and fd["n"] == 3
    assert fd["mean"] == pytest.approx(-2.0) and fd["std"] == pytest.approx(3.0)
    assert p["4"]["swd"]["lower_in"] == 0  # a tie is not "lower"
