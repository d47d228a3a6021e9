"""data.loader=memory: the whole set in one tensor on the training device (docs/design.md §3 "data").

`dataset_images` reads a dataset whole: image folders as uint8 [N, C, R, R] (a folder written by
`agm-fast prepare` through prepare.load_prepared, which checks the manifest's content checksum;
any other folder decoded once, on threads), any other dataset (the procedural shapes) as its
float32 images. MemoryLoader gathers each step's batch from it by the keyed order, then
normalises and flips it where it lives: its stream equals the torch loader's bit for bit.

agm_fast.data builds the loader and hands it the order, the flip and the normalisation (this
module imports nothing from data, which imports it).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)

CHUNK = 1024   # images per load_batch call while a non-image dataset is read whole


def decode_threads(workers: int) -> int:
    """data.workers as a thread count: 0 means up to 4."""
    return workers or min(4, os.cpu_count() or 1)


def dataset_images(dataset, threads: int = 0) -> torch.Tensor:
    """The whole dataset as one CPU tensor [N, C, H, W]: uint8 for datasets of 8-bit images
    (those with `load_uint8`, i.e. image folders), float32 for any other."""
    n = len(dataset)
    if hasattr(dataset, "load_uint8"):
        prepared = _prepared_images(dataset)
        if prepared is not None:
            return prepared
        with ThreadPoolExecutor(decode_threads(threads)) as pool:   # Pillow decodes without the GIL
            return torch.stack(list(pool.map(dataset.load_uint8, range(n))))
    if hasattr(dataset, "load_batch"):   # the torch loader's own batch path, in chunks
        return torch.cat([dataset.load_batch(torch.arange(i, min(i + CHUNK, n))).to(torch.float32)
                          for i in range(0, n, CHUNK)])
    items = [dataset[i] for i in range(n)]
    return torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items]).float()


def _prepared_images(ds) -> torch.Tensor | None:
    """An image folder written by `agm-fast prepare` at the dataset's resolution and channel
    count, read whole and checked against its manifest; None for any other folder."""
    from . import prepare

    manifest = prepare.read_manifest(ds.path)
    if manifest is None or (manifest["resolution"], manifest["channels"]) != (ds.resolution, ds.channels):
        return None
    names = [str(ds.path / manifest["image_names"].format(i)) for i in range(len(ds.files))]
    if len(ds.files) > manifest["count"] or ds.files != names:
        return None
    images, _ = prepare.load_prepared(ds.path)   # ValueError if it no longer matches its checksum
    log.info("memory loader: %s is a prepared folder; checksum verified", ds.path)
    return torch.from_numpy(images[:len(ds.files)]).permute(0, 3, 1, 2).contiguous()


def stored_bytes(dataset) -> int:
    """What `dataset_images` keeps: 1 byte per pixel value for image folders, 4 otherwise."""
    if hasattr(dataset, "load_uint8"):
        return len(dataset) * dataset.channels * dataset.resolution ** 2
    x = dataset[0]
    return len(dataset) * (x[0] if isinstance(x, (tuple, list)) else x).numel() * 4


def host_available_bytes() -> float:
    """MemAvailable of /proc/meminfo (inf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


class MemoryLoader:
    """Yields (step, global_indices [b] CPU int64, images float32 [b, C, H, W] on `device`)
    for steps start_step, start_step + 1, …, like data.BatchLoader with the same slice
    arguments: order(global indices) → dataset indices, normalise(uint8 batch) → float32,
    flip(images, global indices) → the augmented batch (None: no flips).

    On CUDA the set lives on the device when it fits budget_bytes, else in pinned host memory
    (each batch gathered into one of two pinned buffers and copied asynchronously); on the CPU
    the host is the device.
    """

    name = "memory"

    def __init__(self, dataset, *, order, normalise, flip=None, batch_size: int,
                 global_batch: int, rank_offset: int = 0, start_step: int = 0, device="cpu",
                 budget_bytes: float = math.inf, threads: int = 0):
        self.order, self.normalise, self.flip = order, normalise, flip
        self.batch_size, self.global_batch, self.rank_offset = batch_size, global_batch, rank_offset
        self.start_step, self.dataset, self.device = start_step, dataset, torch.device(device)
        images = dataset_images(dataset, threads)
        self.pinned = self.device.type == "cuda" and images.nbytes > budget_bytes
        self.images = images.pin_memory() if self.pinned else images.to(self.device)
        log.info("memory loader: %d images %s %s, %.3g MB %s", len(images), tuple(images.shape[1:]),
                 images.dtype, images.nbytes / 1e6,
                 "in pinned host memory" if self.pinned else f"on {self.device}")

    @property
    def skipped_count(self) -> int:
        """Unreadable images: skipped when the folder was scanned or when it was read."""
        ds = self.dataset
        return len(set(getattr(ds, "skipped", [])) | set(getattr(ds, "load_failures", [])))

    def __iter__(self):
        source, b = self.images, self.batch_size
        staging, copied = [], []   # two pinned gather buffers, each reused once its copy is done
        for step in itertools.count(self.start_step):
            start = step * self.global_batch + self.rank_offset
            gidx = torch.arange(start, start + b, dtype=torch.int64)
            rows = self.order(gidx).to(source.device)
            if self.pinned:
                slot = step % 2
                if len(staging) < 2:
                    staging += [torch.empty((b, *source.shape[1:]), dtype=source.dtype, pin_memory=True)
                                for _ in range(2)]
                    copied += [None, None]
                if copied[slot] is not None:
                    copied[slot].synchronize()
                x = torch.index_select(source, 0, rows, out=staging[slot])
                x = x.to(self.device, non_blocking=True)
                copied[slot] = torch.cuda.Event()
                copied[slot].record()
            else:
                x = source.index_select(0, rows)
            if self.flip is not None:   # before normalising: a permutation, on 1-byte values
                x = self.flip(x, gidx)
            yield step, gidx, self.normalise(x) if x.dtype == torch.uint8 else x
