"""Benchmark of the distributed training path (issue 13, docs/design.md §7): training steps at
world sizes 1 and 2, and the step's own collectives.

Training rows: `agm-fast train` of one preset with the same global batch,
  - one process, no process group (the plain path),
  - torchrun with 1 process (the DDP path at world size 1: what it costs over the plain path),
  - torchrun with 2 processes (half the global batch per rank);
timed as the median wall-clock time per step on rank 0 (from metrics.jsonl, first steps
dropped). Collective rows: the all-gather of V⁺, V⁻, t (3 floats per sample) and of the
post-backward values (4 + 2 per sample), and the stop-flag all-reduce, timed inside a torchrun
launch (a fixed number of calls on every rank, median wall clock).

On the CPU (gloo) this is a functional check, not a speed claim: the ranks share the machine's
cores, so world size 2 gives each rank half of them. On a GPU machine run it with
--device cuda (NCCL) to measure the DDP overhead at world size 1 (target ≤ 2 % over the plain path).

    python bench/bench_ddp.py                 # demo32 at batch 32, 40 steps per row
    python bench/bench_ddp.py --quick         # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SKIP = 5  # first steps dropped (allocator, caches)


def train_cmd(nproc: int | None, run_dir: Path, args) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    sets = [f"train.run_dir={run_dir}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.threads={args.threads}", "train.sample_every=0", "train.eval_images=0", "train.ckpt_every=0",
            "train.progress=false", f"train.device={args.device}", "train.log_every=1000"]
    cmd = launcher + ["-m", "agm_fast.cli", "train", "--preset", args.preset]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def step_ms(run_dir: Path, batch: int) -> float:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(batch / r["img_per_s"] * 1e3 for r in rows[SKIP:])


def fixed_count_ms(fn, device: torch.device, warmup: int = 10, rep: int = 200) -> float:
    """Median wall-clock ms of a collective. The same number of calls on every rank (an adaptive
    timer such as do_bench could call it a different number of times per rank and deadlock)."""
    import time
    times = []
    for i in range(warmup + rep):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def collectives_worker(device: str) -> None:
    """Run under torchrun: time the step's collectives at the bench's batch; rank 0 prints JSON."""
    from agm_fast import distributed, dispatch
    d = distributed.setup(dispatch.resolve_device(device, "--device"))
    try:
        b = int(os.environ["BENCH_PER_RANK"])
        v = torch.randn(3, b, device=d.device)
        post = torch.randn(4 + 2 * b, device=d.device)
        found = {f"all_gather V⁺, V⁻, t ({3 * b} floats per rank)": fixed_count_ms(lambda: d.all_gather(v), d.device),
                 f"all_gather after backward ({4 + 2 * b} floats per rank)":
                     fixed_count_ms(lambda: d.all_gather(post), d.device),
                 "stop-flag all-reduce (1 int64, gloo)": fixed_count_ms(lambda: d.max_over_ranks(0), d.device)}
        if d.is_main:
            print("BENCH " + json.dumps(found))
    finally:
        distributed.teardown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo32")
    p.add_argument("--batch", type=int, default=32, help="global batch (train.batch_size)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--collectives-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.collectives_worker:
        return collectives_worker(args.device)
    if args.quick:
        args.steps = 15
    device = torch.device(args.device)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain_ms = None
        for name, nproc in (("plain, one process (no process group)", None), ("torchrun, world 1 (DDP path)", 1),
                            ("torchrun, world 2 (DDP, gloo)" if device.type == "cpu" else "torchrun, world 2 (DDP)", 2)):
            run = Path(tmp) / f"run-{nproc}"
            out = subprocess.run(train_cmd(nproc, run, args), env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: exit {out.returncode}\n{out.stderr[-3000:]}")
            ms = step_ms(run, args.batch)
            plain_ms = plain_ms or ms
            world = nproc or 1
            rows.append({"name": name, "world": world, "threads_per_rank": args.threads,
                         "shape": [args.batch // world, 3, 32, 32] if args.preset == "demo32" else None,
                         "dtype": "fp32", "ms": ms, "img_per_s": args.batch / ms * 1e3,
                         "vs_plain": ms / plain_ms})
            print(f"{name}: {ms:.1f} ms per step of {args.batch} images ({args.batch / ms * 1e3:.0f} img/s)")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              __file__, "--collectives-worker", "--device", args.device],
                             env=dict(env, BENCH_PER_RANK=str(args.batch // 2)), capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"collectives: exit {out.returncode}\n{out.stderr[-3000:]}")
        found = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH "))[6:])
        for name, ms in found.items():
            rows.append({"name": name, "world": 2, "ms": ms})
            print(f"{name}: {ms * 1e3:.0f} µs")
    label = "CPU, gloo" if device.type == "cpu" else f"{device_name(device)}, NCCL"
    notes = (f"{label}: `{args.preset}` preset, global batch {args.batch}, {args.steps} steps per row "
             f"(median ms per step on rank 0, first {SKIP} dropped), {args.threads} torch thread(s) per rank, "
             f"{os.cpu_count()} logical CPUs shared by all ranks and by other work on the machine. "
             "A functional check of the distributed path, not a speed claim: on the CPU the ranks share "
             "the cores, and a few % between the plain and the world-1 rows is run-to-run noise of a shared "
             "machine. No GPU number here.")
    path = write_results("ddp", device, rows, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
