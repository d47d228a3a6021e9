"""Loss and AGM-diagnostics plot from metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write


def _smooth(y: list[float], k: int) -> list[float]:
    out, acc, window = [], 0.0, []
    for v in y:
        window.append(v)
        acc += v
        if len(window) > k:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def plot_metrics(metrics_path: Path, out_path: Path) -> Path | None:
    """Four panels: L_f (log), L_V, effective sample size, V gap and active-hinge fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("finite", True)]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    k = max(1, len(rows) // 100)
    fig, ax = plt.subplots(2, 2, figsize=(10, 6.5))
    panels = [("loss_f", "L_f (drift, Eq. 13)", True), ("loss_v", "L_V (potential hinge, Eq. 10)", False),
              ("ess", "effective sample size of w", False), ("v_gap", "V gap mean(V⁻ − V⁺)", False)]
    for a, (key, title, logy) in zip(ax.flat, panels):
        y = [r[key] for r in rows]
        a.plot(steps, y, alpha=0.3, lw=0.8)
        a.plot(steps, _smooth(y, k), lw=1.5)
        a.set_title(title)
        a.set_xlabel("step")
        if logy and min(y) > 0:
            a.set_yscale("log")
    a2 = ax[1, 1].twinx()
    a2.plot(steps, _smooth([r["hinge_active"] for r in rows], k), color="tab:red", lw=1)
    a2.set_ylabel("active hinge fraction", color="tab:red")
    fig.tight_layout()
    try:
        return atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
