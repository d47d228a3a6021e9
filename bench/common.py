"""Shared helpers of the bench/ scripts: device description, timing, results files (docs/design.md §7)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from agm_fast.dispatch import package_versions

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}"


def time_ms(fn, device: torch.device, warmup: int = 3, rep: int = 20) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, a wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def write_results(bench: str, device: torch.device, rows: list[dict], notes: str = "") -> Path:
    """Write bench/results/<bench>-<device-slug>-<yyyymmdd>.json and a .md table; return the json."""
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = RESULTS / f"{bench}-{slug}-{now:%Y%m%d}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"bench": bench, "device": name, **package_versions(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": now.isoformat(timespec="seconds"), "notes": notes, "rows": rows}
    if device.type == "cuda":
        doc["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {bench} on {name} ({now:%Y-%m-%d})", "", notes, "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".json")
