"""Benchmark of the data loaders (issue 11, docs/design.md §7): images/s each loader delivers.

A prepared folder (`agm-fast prepare` output: R×R PNGs + manifest) of procedural shapes with
mild pixel noise (so the PNGs do not compress like flat drawings) at 64² and 256², read by
data.loader = torch (DataLoader workers 0 and 2), dali (its CPU pipeline here; the GPU one on
CUDA) and memory, through data.make_loader as the trainer does, with flips on. Each row: the
one-off set-up (DataLoader start, DALI pipeline build, the memory loader's read of the whole
set) and the steady rate over whole batches after two warm-up batches.

    python bench/bench_data.py            # ≈ 2 min on 2 CPU cores
    python bench/bench_data.py --quick    # fewer batches

The target (issue 11) is against the training step's consumption at the same resolution on a
GPU (the loader in use ≥ 3× at 64²); no step benchmark has been recorded yet, so the rows stand
alone.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results  # noqa: E402

from agm_fast import config, dali, data, prepare  # noqa: E402
from agm_fast.shapes import ShapesDataset  # noqa: E402

CASES = {64: dict(images=1024, batch=64), 256: dict(images=256, batch=32)}


def prepared_folder(root: Path, resolution: int, count: int) -> Path:
    source = root / f"source{resolution}"
    source.mkdir()
    shapes = ShapesDataset(count, resolution=resolution, channels=3, seed=0)
    rng = np.random.default_rng(0)
    for start in range(0, count, 128):
        x = shapes.render(torch.arange(start, min(start + 128, count)))
        pixels = ((x + 1) * 127.5).permute(0, 2, 3, 1).numpy()
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
        for i, p in enumerate(pixels):
            Image.fromarray(p).save(source / f"{start + i:06d}.png")
    out = root / f"prepared{resolution}"
    prepare.prepare(source, out, resolution, 3, progress=False)
    return out


def measure(path: Path, resolution: int, loader: str, workers: int, batch: int, batches: int,
            device: torch.device) -> dict:
    cfg = config.load("demo32", ["data.dataset=folder", f"data.path={path}",
                                 f"data.resolution={resolution}", f"data.loader={loader}",
                                 f"data.workers={workers}", f"train.batch_size={batch}",
                                 "data.hflip=true"])
    dataset = data.make_dataset("folder", path=path, resolution=resolution, channels=3)
    t0 = time.perf_counter()
    made = data.make_loader(cfg, dataset, device=device, start_step=0)
    it = iter(made)
    for _ in range(2):   # warm-up: worker start, pipeline prefetch
        next(it)
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _, _, images in itertools.islice(it, batches):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t1
    if loader == "dali":
        name = f"DALI {'GPU (mixed)' if device.type == 'cuda' else 'CPU'} pipeline, {made.threads} threads"
    else:
        name = f"torch DataLoader, workers={workers}" if loader == "torch" else f"memory (on {device})"
    row = {"name": name, "resolution": resolution, "batch": batch, "batches": batches,
           "img_per_s": batches * batch / seconds, "setup_s": setup_s}
    print(f"{resolution:4d}²  {name:38s} {row['img_per_s']:10.0f} img/s   set-up {setup_s:6.2f} s")
    del it, made
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches per row")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the training device)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads in this process (what train.threads sets)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ok, why = dali.status()
    loaders = [("torch", 0), ("torch", 2)] + ([("dali", 2)] if ok else []) + [("memory", 0)]
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, case in CASES.items():
            path = prepared_folder(Path(tmp), resolution, case["images"])
            batches = (8 if args.quick else 24) * (1 if resolution == 64 else 2) // (2 if args.quick else 1)
            for loader, workers in loaders:
                rows.append(measure(path, resolution, loader, workers, case["batch"], batches, device))
    cpu = (f"CPU, {os.cpu_count()} cores (load average {load:.1f} at the start: other jobs shared "
           f"them), torch threads {args.threads} in the main process")
    notes = (f"{cpu if device.type == 'cpu' else device_name(device)}. Prepared PNG folders of noisy "
             f"procedural shapes (64²: {CASES[64]['images']} images, batch {CASES[64]['batch']}; "
             f"256²: {CASES[256]['images']} images, batch {CASES[256]['batch']}); flips on; float32 "
             f"[-1, 1] NCHW batches on {device}. img_per_s: steady rate over whole batches after "
             f"two warm-up batches; setup_s: loader creation + the warm-up (the memory loader reads "
             f"and checksums the whole set there). {why if ok else 'DALI rows missing: ' + why}. "
             f"No step benchmark is recorded yet to compare the step's consumption with.")
    print(write_results("data", device, rows, notes))


if __name__ == "__main__":
    main()
