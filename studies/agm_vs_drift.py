"""AGM vs the drift-only baseline at equal steps on real data (issue 12).

    .venv/bin/python studies/agm_vs_drift.py --out runs/study [--threads 1] [--smoke] [--ablations]

Trains, for each dataset (Fashion-MNIST 28² grey, emoji 32² RGB) and each seed, the two arms of
docs/design.md §1 with everything else identical (steps, batch, nets, optimiser, seeds):
  agm    weights.scheme=softmax  (importance weights from the stop-gradient scores of V_φ)
  drift  weights.scheme=uniform  (w ≡ 1: plain bridge matching)
through agm_fast.trainer, one run directory per (dataset, arm, seed) under OUT/runs/. Quality
comes from the trainer's periodic evaluation (train.eval_every, train.eval_n): FD-EffLite0 (never
FID), KID and the pixel SWD of the EMA drift's samples at several steps, in each run's
metrics.jsonl. Then it aggregates (mean ± sample std over seeds, ddof = 1) into OUT/study.json,
OUT/study.md and OUT/study.png. The prepared data folders (agm_fast.prepare) are made first when
missing (under --data-dir).

Resumable: rerunning the same command skips finished runs (study_done.json in the run directory,
written with the run's configuration), resumes interrupted ones from their checkpoints (the
trainer's exact resume), and redoes the aggregation from the metrics files. A finished run whose
configuration differs from this invocation's (e.g. --smoke output in the same --out) is an error.

Compute: FLOPs per training step by torch.utils.flop_counter.FlopCounterMode (which counts
matmuls and convolutions, not elementwise work such as GroupNorm, SiLU or AdamW) over one AGMStep
call (forward and backward of both nets, as trained) and over the nets each
arm needs by itself (the drift-only arm: f_θ forward + backward; AGM: that plus V_φ forward +
backward on the positive and the negative bridge samples). The trainer trains V_φ in both arms
(its diagnostics), so the as-trained FLOPs and wall clock of the two arms are the same here; the
"method" FLOPs say what a drift-only trainer would spend. Wall clock per run: measured around the
trainer (summed over resumed sessions) and, from metrics.jsonl, its training and evaluation parts.

Sizing (CPU, 2 cores shared with other jobs, train.threads = 1; README "AGM vs drift-only
study"): 2 datasets × 2 arms × 3 seeds = 12 runs in ≈ 60 min (≤ 90) is ≈ 5 min a run. Measured
at load ≈ 3 on this configuration: one training step (batch 32) 0.32 s on either dataset; one
evaluation's sampling (128 images × 50 EM steps) 16 s (Fashion-MNIST) / 18 s (emoji), plus ≈ 3 s
of EfficientNet-Lite0 features and metrics. FLOPs (FlopCounterMode): 9.2 GFLOP a step on
Fashion-MNIST, 12.1 on emoji (V_φ: 0.21 / 0.26 of them). A run of SIZING: 500 × 0.32 s + 4 × 20 s
+ ≈ 20 s (file listing, the reference's features, checkpoints, loss.png) ≈ 260 s; the study
≈ 52 min. On a busier machine it stretches: at load 8–10 a step took 1.0–1.7 s and an
evaluation 86–170 s (≈ 3.5× the study); --steps and --eval-n shrink it.

What was cut for that, against the presets and the paper: a small drift U-Net (16 base channels,
multipliers [1, 2, 2], one block per level, no attention: 0.27M parameters), batch 32, 500 steps
(16,000 images: a quarter of one Fashion-MNIST epoch, 4 emoji epochs), 50 Euler–Maruyama
sampling steps (paper: 200; bridge.t_eps = 0.02 ≤ 1/50), 4 evaluations of 128 samples against
128 training images (FD at N = 128 on 1280 features is biased upwards and noisy: compare arms at
equal N only; KID is unbiased), no sample grids or end-of-run report (train.sample_every = 0,
train.eval_images = 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agm_fast import config as config_mod  # noqa: E402
from agm_fast.files import atomic_write, atomic_write_text  # noqa: E402

# source name for agm_fast.prepare, folder name under --data-dir, resolution, channels
DATASETS = {
    "fashion-mnist": dict(source="fashion-mnist", folder="fashion-mnist28", resolution=28, channels=1),
    "emoji": dict(source="emoji", folder="emoji32", resolution=32, channels=3),
}
ARMS = {"agm": ["weights.scheme=softmax"], "drift": ["weights.scheme=uniform"]}
# behind --ablations only: AGM variants of docs/design.md §1's interpretations
ABLATIONS = {"agm-tbins": ["weights.scheme=softmax", "weights.normalise=t_bins"]}
SEEDS = (0, 1, 2)

# identical in every arm; the short-CPU-run choices of the demo preset (lr, warm-up, EMA, x1 loss)
COMMON = [
    "model.channels=16", "model.channel_mult=[1, 2, 2]", "model.num_blocks=1", "model.attn_resolutions=[]",
    "model.dropout=0.0", "model.predicts=x1", "potential.channels=[16, 32, 64]",
    "train.batch_size=32", "optim.lr=1e-3", "optim.lr_potential=5e-4", "optim.warmup_steps=100",
    "ema.halflife_kimg=2.0", "sample.steps=50", "bridge.t_eps=0.02",
    "train.sample_every=0", "train.eval_images=0", "train.progress=false", "train.device=cpu",
    "train.log_every=100",
    # per batch from the PNGs: the memory loader's up-front decode of all 70,000 Fashion-MNIST
    # images (≈ 20 s a run) costs more than the ≈ 19,000 a run reads
    "data.loader=torch", "data.workers=0",
]
SIZING = dict(steps=500, eval_every=125, eval_n=128, ckpt_every=125)  # --steps N: evaluations at N/4, N/2, …
SMOKE = dict(steps=2, eval_every=1, eval_n=6, ckpt_every=1,
             overrides=["train.batch_size=4", "sample.steps=4", "bridge.t_eps=0.25"])
METRICS = ("FD-EffLite0", "kid_mean", "swd")   # the per-step numbers aggregated and plotted
KEYS_NOT_COMPARED = ("train.threads", "train.progress")  # may change between sessions of one run

DONE_NAME = "study_done.json"
TIMING_NAME = "study_timing.json"


# ----------------------------------------------------------------------------- configuration

def run_overrides(dataset: str, arm_overrides: list[str], seed: int, sizing: dict, data_dir: Path,
                  run_dir: Path, threads: int) -> list[str]:
    d = DATASETS[dataset]
    return COMMON + [
        "data.dataset=folder", f"data.path={data_dir / d['folder']}", f"data.resolution={d['resolution']}",
        f"data.channels={d['channels']}", f"train.seed={seed}", f"sample.seed={seed}",
        f"train.steps={sizing['steps']}", f"train.eval_every={sizing['eval_every']}",
        f"train.eval_n={sizing['eval_n']}", f"train.ckpt_every={sizing['ckpt_every']}",
        f"train.threads={threads}", f"train.run_dir={run_dir}",
    ] + sizing.get("overrides", []) + arm_overrides


def comparable(cfg_dict: dict) -> dict:
    out = json.loads(json.dumps(cfg_dict))
    for key in KEYS_NOT_COMPARED:
        section, name = key.split(".")
        out[section].pop(name, None)
    return out


# ----------------------------------------------------------------------------- data

def ensure_prepared(dataset: str, data_dir: Path, *, fashion_mnist_dir=None, emoji_package=None) -> Path:
    """The prepared folder of `dataset`, made by agm_fast.prepare when it has no manifest (a
    killed prepare is redone: prepare replaces its own unfinished output)."""
    from agm_fast import prepare
    d = DATASETS[dataset]
    folder = data_dir / d["folder"]
    if prepare.read_manifest(folder) is None:
        print(f"preparing {dataset} into {folder}", flush=True)
        prepare.prepare(d["source"], folder, d["resolution"], d["channels"], fashion_mnist_dir=fashion_mnist_dir,
                        emoji_package=emoji_package, progress=False)
    return folder


# ----------------------------------------------------------------------------- training

def train_one(overrides: list[str], run_dir: Path) -> str:
    """Train one run to the end (resuming) unless it is finished; returns "skipped", "trained"."""
    from agm_fast.cli import _setup_logging
    from agm_fast.trainer import Trainer

    cfg = config_mod.load(None, overrides)
    want = comparable(config_mod.to_dict(cfg))
    done = run_dir / DONE_NAME
    if done.exists():
        if comparable(json.loads(done.read_text())["config"]) != want:
            raise SystemExit(f"{run_dir} holds a finished run of another configuration; give another --out")
        return "skipped"
    previous = run_dir / "config.json"
    if previous.exists() and comparable(json.loads(previous.read_text())) != want:
        raise SystemExit(f"{run_dir} holds a run of another configuration; give another --out")
    _setup_logging(str(run_dir))
    timing_path = run_dir / TIMING_NAME
    sessions = json.loads(timing_path.read_text())["sessions"] if timing_path.exists() else []
    t0 = time.perf_counter()
    try:
        result = Trainer(cfg, resume=True).run()
    finally:  # the next run logs to its own train.log
        for h in logging.getLogger("agm_fast").handlers:
            h.close()
    sessions.append({"start_step": None if not sessions else sessions[-1]["end_step"], "end_step": result["step"],
                     "wall_s": round(time.perf_counter() - t0, 3)})
    atomic_write_text(timing_path, json.dumps({"sessions": sessions}, indent=1) + "\n")
    if result["stopped_by"]:
        raise SystemExit(f"stopped by {result['stopped_by']} at step {result['step']} of {run_dir}; "
                         "rerun the same command to resume")
    atomic_write_text(done, json.dumps({"config": config_mod.to_dict(cfg), "step": result["step"],
                                        "wall_s": sum(s["wall_s"] for s in sessions)}, indent=1) + "\n")
    return "trained"


# ----------------------------------------------------------------------------- compute

def step_flops(overrides: list[str]) -> dict:
    """FLOPs of one training step of this configuration: as trained (one AGMStep call: both
    nets' forward, backward and AdamW) and per net (drift f_θ forward + backward on the batch;
    potential V_φ forward + backward on the positive and negative bridge samples)."""
    from torch.utils.flop_counter import FlopCounterMode

    from agm_fast import models
    from agm_fast.checkpoint import drift_arch, potential_arch
    from agm_fast.step import AGMStep

    cfg = config_mod.load(None, overrides)
    torch.manual_seed(0)
    drift = models.DriftUNet(**drift_arch(cfg))
    potential = models.PotentialNet(**potential_arch(cfg))
    ema = models.DriftUNet(**drift_arch(cfg)).requires_grad_(False)
    o = cfg.optim
    opt_f = torch.optim.AdamW(drift.parameters(), lr=o.lr, betas=tuple(o.betas))
    opt_v = torch.optim.AdamW(potential.parameters(), lr=o.lr_potential, betas=tuple(o.betas))
    step = AGMStep(cfg, drift, potential, ema, opt_f, opt_v, device=torch.device("cpu"), kernels="torch",
                   autocast_dtype=None)
    b, c, r = cfg.train.batch_size, cfg.data.channels, cfg.data.resolution
    x1 = torch.rand(b, c, r, r) * 2 - 1
    indices = torch.arange(b)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    t = torch.rand(b)
    x = torch.randn(b, c, r, r)
    return {"agm_step_as_trained": count(lambda: step(indices, x1, 0)),
            "drift_fwd_bwd": count(lambda: drift(x, t).square().sum().backward()),
            "potential_fwd_bwd_pos_neg": count(lambda: (potential(x, t).sum() + potential(x, t).sum()).backward()),
            "parameters": {"drift": models.count_parameters(drift), "potential": models.count_parameters(potential)}}


def method_flops(flops: dict, scheme: str) -> int:
    """What the arm needs by itself per step (module docstring)."""
    f = flops["drift_fwd_bwd"]
    return f + flops["potential_fwd_bwd_pos_neg"] if scheme == "softmax" else f


# ----------------------------------------------------------------------------- aggregation

def read_run(run_dir: Path) -> dict:
    """Per eval step FD-EffLite0, KID mean/std, SWD (and the eval's seconds) of one run, and its
    wall clock: measured sessions, and from metrics.jsonl the loop's time (the sum of the step
    intervals the trainer logs, batch / img_per_s, evaluations and checkpoints included) less the
    evaluations'."""
    evals, loop_s, steps_logged = {}, 0.0, 0
    cfg = json.loads((run_dir / "config.json").read_text())
    batch = cfg["train"]["batch_size"]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row.get("eval"), dict):
            e = row["eval"]
            evals[row["step"]] = {k: e.get(k) for k in METRICS + ("kid_std", "seconds")}
        elif row.get("img_per_s"):
            loop_s += batch / row["img_per_s"]
            steps_logged = max(steps_logged, row["step"] + 1)
    eval_s = sum(e["seconds"] or 0.0 for e in evals.values())
    # the evaluation after step k (k steps done) falls in the interval of the step row k; the
    # one after the last step in none
    in_loop = sum(e["seconds"] or 0.0 for k, e in evals.items() if k < steps_logged)
    timing_path = run_dir / TIMING_NAME
    sessions = json.loads(timing_path.read_text())["sessions"] if timing_path.exists() else []
    return {"evals": {str(k): evals[k] for k in sorted(evals)},
            "wall_s": round(sum(s["wall_s"] for s in sessions), 3), "sessions": sessions,
            "train_s_from_metrics": round(loop_s - in_loop, 3), "eval_s": round(eval_s, 3)}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) over seeds."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if not n:
        return {"mean": None, "std": None, "n": 0}
    m = sum(vals) / n
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": s, "n": n}


def aggregate_arm(runs: dict[int, dict]) -> dict:
    """Over the seeds of one (dataset, arm): per eval step that every seed reached, mean ± std of
    each metric; the final step's; the mean wall clock."""
    steps = sorted(set.intersection(*(set(r["evals"]) for r in runs.values())), key=int) if runs else []
    per_step = {s: {k: mean_std([r["evals"][s][k] for r in runs.values()]) for k in METRICS + ("kid_std",)}
                for s in steps}
    return {"seeds": sorted(runs), "per_step": per_step, "final_step": int(steps[-1]) if steps else None,
            "final": per_step[steps[-1]] if steps else None,
            "wall_s": mean_std([r["wall_s"] for r in runs.values()]),
            "train_s_from_metrics": mean_std([r["train_s_from_metrics"] for r in runs.values()]),
            "eval_s": mean_std([r["eval_s"] for r in runs.values()])}


def paired_against_baseline(arm: dict, baseline: dict) -> dict:
    """Per eval step and metric, the per-seed differences arm − baseline (the same seed: the same
    data order, initialisation and noise, so the pair differs only by the arm's change), their
    mean ± std and in how many seeds the arm is lower (better)."""
    out = {}
    for step in arm["per_step"]:
        if step not in baseline["per_step"]:
            continue
        seeds = [s for s in arm["runs"] if s in baseline["runs"]]
        out[step] = {}
        for k in METRICS:
            diffs = [arm["runs"][s]["evals"][step][k] - baseline["runs"][s]["evals"][step][k] for s in seeds]
            out[step][k] = {**mean_std(diffs), "per_seed": diffs, "lower_in": sum(d < 0 for d in diffs)}
    return out


def _pm(ms: dict | None, fmt: str) -> str:
    if not ms or ms["mean"] is None:
        return "–"
    return f"{ms['mean']:{fmt}} ± {ms['std']:{fmt.lstrip('+')}}"


def write_markdown(study: dict, path: Path) -> None:
    s = study["sizing"]
    lines = [f"# AGM vs drift-only ({study['date']}, {study['device']})", "",
             f"{s['steps']} steps × batch {study['batch_size']}, seeds {study['seeds']}, evaluation every "
             f"{s['eval_every']} steps on N = {s['eval_n']} samples vs {s['eval_n']} training images "
             f"(FD-EffLite0 is not FID). Final = step {s['steps']}; mean ± std over seeds (ddof 1).", "",
             "| dataset | arm | FD-EffLite0 | KID | SWD | GFLOP/step as trained | GFLOP/step method | "
             "wall clock per run (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for ds, arms in study["arms"].items():
        for arm, a in arms.items():
            f = a["final"] or {}
            lines.append(f"| {ds} | {arm} | {_pm(f.get('FD-EffLite0'), '.3g')} | {_pm(f.get('kid_mean'), '.3g')} | "
                         f"{_pm(f.get('swd'), '.3g')} | {a['flops']['as_trained'] / 1e9:.3g} | "
                         f"{a['flops']['method'] / 1e9:.3g} | {_pm(a['wall_s'], '.0f')} s |")
    lines += ["", "Lower is better for every metric. GFLOP/step as trained: one AGMStep call (both arms train "
              "V_φ in this trainer); method: what the arm needs by itself (drift-only: f_θ forward + backward).",
              "", "Paired by seed (same data order, initialisation and noise): arm − drift-only, mean ± std over "
              "seeds, and in how many seeds the arm is lower (better).", "",
              "| dataset | arm | step | Δ FD-EffLite0 | Δ KID | Δ SWD |", "|---|---|---|---|---|---|"]
    for ds, arms in study["paired"].items():
        for arm, steps in arms.items():
            for step, m in steps.items():
                cells = [f"{_pm(m[k], '+.3g')} ({m[k]['lower_in']}/{m[k]['n']})" for k in METRICS]
                lines.append(f"| {ds} | {arm} | {step} | " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_plot(study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"FD-EffLite0": "FD-EffLite0", "kid_mean": "KID (mean)", "swd": "sliced Wasserstein (pixels)"}
    datasets = list(study["arms"])
    fig, axes = plt.subplots(len(datasets), len(METRICS), figsize=(4.2 * len(METRICS), 3.2 * len(datasets)),
                             squeeze=False)
    for i, ds in enumerate(datasets):
        for j, key in enumerate(METRICS):
            ax = axes[i][j]
            for arm, a in study["arms"][ds].items():
                pts = [(int(s), v[key]) for s, v in a["per_step"].items() if v[key]["mean"] is not None]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                m = [p[1]["mean"] for p in pts]
                sd = [p[1]["std"] for p in pts]
                ax.plot(x, m, marker="o", label=f"{arm} (n={pts[0][1]['n']})")
                ax.fill_between(x, [a_ - b_ for a_, b_ in zip(m, sd)], [a_ + b_ for a_, b_ in zip(m, sd)], alpha=0.25)
            ax.set_title(f"{ds}: {titles[key]}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("AGM vs drift-only: mean ± std over seeds (lower is better)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study folder: runs/, study.json, study.md, study.png")
    p.add_argument("--data-dir", default=str(REPO / "data"),
                   help="where the prepared folders are (made when missing): fashion-mnist28/, emoji32/")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run (train.threads)")
    p.add_argument("--steps", type=int, default=SIZING["steps"],
                   help="training steps per run (a multiple of 4: evaluations and checkpoints every steps/4)")
    p.add_argument("--eval-n", type=int, default=SIZING["eval_n"], help="samples per evaluation (train.eval_n)")
    p.add_argument("--smoke", action="store_true", help=f"a tiny run of the whole pipeline: {SMOKE}")
    p.add_argument("--ablations", action="store_true", help=f"also the AGM variants {sorted(ABLATIONS)}")
    p.add_argument("--fashion-mnist-dir", default=None, help="passed to agm-fast prepare")
    p.add_argument("--emoji-package", default=None, help="passed to agm-fast prepare")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, data_dir = Path(args.out), Path(args.data_dir)
    if args.threads < 1:
        raise SystemExit("--threads must be ≥ 1")
    torch.set_num_threads(args.threads)
    if args.steps < 4 or args.steps % 4:
        raise SystemExit(f"--steps={args.steps}: give a multiple of 4 (evaluations every steps/4)")
    sizing = dict(SMOKE) if args.smoke else dict(steps=args.steps, eval_every=args.steps // 4, eval_n=args.eval_n,
                                                  ckpt_every=args.steps // 4)
    arms = dict(ARMS, **(ABLATIONS if args.ablations else {}))
    for ds in DATASETS:
        ensure_prepared(ds, data_dir, fashion_mnist_dir=args.fashion_mnist_dir, emoji_package=args.emoji_package)

    t_study = time.perf_counter()
    runs: dict = {}
    for ds in DATASETS:
        for arm, arm_over in arms.items():
            for seed in SEEDS:
                run_dir = out / "runs" / ds / arm / f"seed{seed}"
                over = run_overrides(ds, arm_over, seed, sizing, data_dir, run_dir, args.threads)
                t0 = time.perf_counter()
                what = train_one(over, run_dir)
                print(f"{'skipped finished' if what == 'skipped' else 'trained'} {ds}/{arm}/seed{seed} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                runs.setdefault(ds, {}).setdefault(arm, {})[seed] = read_run(run_dir)

    study_arms, flops = {}, {}
    for ds in DATASETS:
        study_arms[ds] = {}
        for arm, arm_over in arms.items():
            over = run_overrides(ds, arm_over, SEEDS[0], sizing, data_dir, out / "flops", args.threads)
            key = (ds, tuple(arm_over))
            flops[key] = flops.get(key) or step_flops(over)
            scheme = config_mod.load(None, over).weights.scheme
            a = aggregate_arm(runs[ds][arm])
            a["flops"] = {"as_trained": flops[key]["agm_step_as_trained"], "method": method_flops(flops[key], scheme),
                          **{k: v for k, v in flops[key].items() if k != "agm_step_as_trained"}}
            a["overrides"] = arm_over
            a["runs"] = {str(s): r for s, r in runs[ds][arm].items()}
            study_arms[ds][arm] = a

    base_cfg = config_mod.load(None, run_overrides("emoji", [], 0, sizing, data_dir, out / "runs", args.threads))
    study = {
        "format": "agm_fast.study.agm_vs_drift.v1",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s)",
        "smoke": args.smoke, "sizing": sizing, "seeds": list(SEEDS), "batch_size": base_cfg.train.batch_size,
        "common_overrides": COMMON, "datasets": DATASETS,
        "config_example": config_mod.to_dict(base_cfg),
        "aggregation": "mean and sample std (ddof 1) over seeds, at eval steps every seed reached",
        "metrics_note": "FD-EffLite0 is a Fréchet distance on EfficientNet-Lite0 features, not FID; small N",
        "arms": study_arms,
        "paired": {ds: {arm: paired_against_baseline(a, arms_["drift"]) for arm, a in arms_.items() if arm != "drift"}
                   for ds, arms_ in study_arms.items()},
        "wall_s_this_invocation": round(time.perf_counter() - t_study, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(study, indent=1) + "\n")
    write_markdown(study, out / "study.md")
    write_plot(study, out / "study.png")
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}", flush=True)
    return study


if __name__ == "__main__":
    main()
