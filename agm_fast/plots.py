"""Loss and AGM-diagnostics plot from metrics.jsonl (matplotlib, no display needed), with a row of
the evaluations during training (train.eval_every) when the file holds any."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write

EVAL_KEYS = ("kid_mean", "swd")  # drawn after the Fréchet distance, whose key is the backbone's label


def _smooth(y: list[float], k: int) -> list[float]:
    out, acc, window = [], 0.0, []
    for v in y:
        window.append(v)
        acc += v
        if len(window) > k:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(finite loss rows, eval rows) of metrics.jsonl: eval rows are {"step": k, "eval": {...}}."""
    evals = [r for r in rows if isinstance(r.get("eval"), dict)]
    losses = [r for r in rows if "eval" not in r and r.get("finite", True)]
    return losses, evals


def eval_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric → (steps, values) of the eval rows: the Fréchet distance under its label (e.g.
    "FD-EffLite0"; never renamed), then kid_mean and swd, each where the rows hold it."""
    _, evals = split_rows(rows)
    labels = [k for r in evals for k in r["eval"] if k.startswith(("FD-", "FID"))]
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key in list(dict.fromkeys(labels)) + list(EVAL_KEYS):
        pts = [(r["step"], r["eval"][key]) for r in evals if isinstance(r["eval"].get(key), (int, float))]
        if pts:
            out[key] = ([s for s, _ in pts], [v for _, v in pts])
    return out


_EVAL_TITLES = {"kid_mean": "KID (unbiased, mean)", "swd": "sliced Wasserstein (pixels)"}


def plot_metrics(metrics_path: Path, out_path: Path) -> Path | None:
    """Four panels: L_f (log), L_V, effective sample size, V gap and active-hinge fraction; below
    them, when metrics.jsonl holds eval rows, one panel per evaluation metric vs step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    rows, _ = split_rows(all_rows)
    if not rows:
        return None
    series = eval_series(all_rows)
    steps = [r["step"] for r in rows]
    k = max(1, len(rows) // 100)
    if series:
        fig = plt.figure(figsize=(10, 9.5))
        gs = fig.add_gridspec(3, 6)
        ax = [fig.add_subplot(gs[i, j:j + 3]) for i in range(2) for j in (0, 3)]
        w = 6 // len(series)
        eval_ax = [fig.add_subplot(gs[2, i * w:(i + 1) * w]) for i in range(len(series))]
    else:
        fig, grid = plt.subplots(2, 2, figsize=(10, 6.5))
        ax, eval_ax = list(grid.flat), []
    panels = [("loss_f", "L_f (drift, Eq. 13)", True), ("loss_v", "L_V (potential hinge, Eq. 10)", False),
              ("ess", "effective sample size of w", False), ("v_gap", "V gap mean(V⁻ − V⁺)", False)]
    for a, (key, title, logy) in zip(ax, panels):
        y = [r[key] for r in rows]
        a.plot(steps, y, alpha=0.3, lw=0.8)
        a.plot(steps, _smooth(y, k), lw=1.5)
        a.set_title(title)
        a.set_xlabel("step")
        if logy and min(y) > 0:
            a.set_yscale("log")
    a2 = ax[3].twinx()
    a2.plot(steps, _smooth([r["hinge_active"] for r in rows], k), color="tab:red", lw=1)
    a2.set_ylabel("active hinge fraction", color="tab:red")
    for a, (key, (s, y)) in zip(eval_ax, series.items()):
        a.plot(s, y, marker="o", lw=1.2, color="tab:green")
        a.set_title(_EVAL_TITLES.get(key, key) + " (eval)")
        a.set_xlabel("step")
    fig.tight_layout()
    try:
        return atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
