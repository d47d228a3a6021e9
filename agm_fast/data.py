"""Image folders, the keyed data order and the loaders (docs/design.md §1 "Noise", §3 "data").

Datasets give float32 images in [-1, 1] shaped [C, H, W]: ImageFolderDataset (every image file
under a folder, recursive, centre-cropped and resized) here, the procedural ShapesDataset in
agm_fast.shapes; `make_dataset` picks one.

Order is a pure function of the global sample index g (not of the world size): sample g belongs
to epoch g // N at position g % N of that epoch's seeded permutation. Step s with global batch B
trains on g ∈ [s·B, (s+1)·B); a rank or micro-batch takes a contiguous slice. So the data
position *is* the step, and resuming at step s reproduces the run exactly.

`data.loader` (README "Data loaders"; `make_loader` picks and logs why): "torch", the reference
(torch.utils.data.DataLoader, workers prefetch whole batches); "memory" (MemoryLoader: the whole
set in one tensor on the training device, batches gathered there); "dali" (agm_fast.dali, the
optional NVIDIA DALI pipeline). All three give the same (step, indices, images) stream.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import rng
from .shapes import ShapesDataset, _check_channels, _check_int
from .config import ConfigError, check_choice
from .images import IMAGE_EXTENSIONS, scan_image_files, square_pixels
from .memory import MemoryLoader, decode_threads, host_available_bytes, stored_bytes

log = logging.getLogger(__name__)

# Within rng.Stream.DATA the step word separates uses: 0 = flips (keyed by global sample index),
# shapes.SHAPES_STEP = the shape parameters of ShapesDataset (keyed by dataset index).
FLIP_STEP = 0


# ----------------------------------------------------------------------------- image folder

class ImageFolderDataset(Dataset):
    """Every image file under `path` (recursive, sorted, hidden files skipped).

    Each image is converted as `agm-fast prepare` converts it (agm_fast.images.square_pixels: EXIF
    orientation, transparency on white, centre crop, Lanczos resize to `resolution`, RGB for
    channels=3 or grey for channels=1) → float32 [-1, 1] [C, R, R]. Files Pillow cannot open
    and verify are skipped at construction; a file that still fails when loaded is replaced by
    the next readable index (deterministic). Both are listed in `skipped` / `load_failures`.
    `max_images` keeps the first readable files in sorted order (quick runs on big folders).
    """

    def __init__(self, path, resolution: int, channels: int = 3, max_images: int | None = None):
        from PIL import Image

        self.resolution = _check_int("resolution", resolution, 1)
        self.channels = _check_channels(channels)
        if max_images is not None:
            _check_int("max_images", max_images, 1)
        self.path = Path(path)
        kinds = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        if not self.path.exists():
            raise ValueError(f"data path {str(self.path)!r} does not exist: expected a folder "
                             f"of images ({kinds})")
        if not self.path.is_dir():
            raise ValueError(f"data path {str(self.path)!r} is not a directory: expected a "
                             f"folder of images ({kinds})")
        candidates, _ = scan_image_files(self.path)
        if not candidates:
            raise ValueError(f"no image files ({kinds}) found under {str(self.path)!r}")

        self.files: list[str] = []
        self.skipped: list[str] = []
        for file in candidates:
            try:
                with Image.open(file) as im:
                    im.verify()
            except Exception:  # Pillow raises many types for bad files; all mean "skip"
                self.skipped.append(file)
                continue
            self.files.append(file)
            if max_images is not None and len(self.files) == max_images:
                break
        if not self.files:
            raise ValueError(f"no readable images under {str(self.path)!r}: all "
                             f"{len(self.skipped)} image files failed to open "
                             f"(first: {self.skipped[0]})")
        if self.skipped:
            log.warning("skipped %d unreadable image file(s) under %s (first: %s)",
                        len(self.skipped), self.path, self.skipped[0])
        self.load_failures: list[str] = []   # files that verified but failed to decode later
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_unit_range(self.load_uint8(index))

    def load_uint8(self, index: int) -> torch.Tensor:
        """Image `index` as uint8 [C, R, R] (what __getitem__ maps to [-1, 1])."""
        index = int(index)
        n = len(self.files)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            try:
                x = torch.from_numpy(self._pixels(self.files[i]))
                return (x[None] if x.dim() == 2 else x.permute(2, 0, 1)).contiguous()
            except Exception:
                self._bad.add(i)
                self.load_failures.append(self.files[i])
                log.warning("image %s failed to load; using the next readable image instead",
                            self.files[i])
        raise RuntimeError(f"none of the {n} images under {str(self.path)!r} could be loaded")

    def load_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices.reshape(-1)])

    def _pixels(self, file: str) -> np.ndarray:
        from PIL import Image

        with Image.open(file) as im:
            return square_pixels(im, self.resolution, self.channels)[0]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [-1, 1] (x·2/255 − 1): the one normalisation of every loader."""
    return images.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)


def make_dataset(kind: str, *, path=None, resolution: int, channels: int,
                 num_images: int | None = None, seed: int = 0) -> Dataset:
    """'shapes' → ShapesDataset(num_images, …); 'folder' → ImageFolderDataset(path, …),
    where num_images (if given) keeps only the first readable files."""
    if check_choice("data.dataset", kind) == "shapes":
        if num_images is None:
            raise ValueError("num_images is required for kind='shapes' (how many images)")
        return ShapesDataset(num_images, resolution=resolution, channels=channels, seed=seed)
    if path is None or str(path) == "":
        raise ValueError("path is required for kind='folder' (a folder of images)")
    return ImageFolderDataset(path, resolution, channels=channels, max_images=num_images)


# ----------------------------------------------------------------------------- order

def _epoch_seed(seed: int, epoch: int) -> int:
    # a hash, not seed + epoch: neighbouring seeds must not share shifted permutations
    digest = hashlib.blake2b(f"agm_fast.data:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@functools.lru_cache(maxsize=4)   # the current epoch (and the next, at a boundary) stay cached
def epoch_permutation(seed: int, epoch: int, dataset_len: int) -> torch.Tensor:
    """The permutation of dataset indices used in `epoch` (CPU LongTensor [dataset_len])."""
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(dataset_len, generator=generator)


def sample_order(global_index: torch.Tensor, dataset_len: int, seed: int) -> torch.Tensor:
    """Dataset index of each global sample index: g → perm_{epoch = g // N}[g % N]."""
    _check_int("dataset_len", dataset_len, 1)
    _check_int("seed", seed, 0)
    g = torch.as_tensor(global_index, dtype=torch.int64)
    if g.numel() and int(g.min()) < 0:
        raise ValueError("global_index must be non-negative")
    g_cpu = g.reshape(-1).cpu()
    epoch, position = g_cpu // dataset_len, g_cpu % dataset_len
    out = torch.empty_like(g_cpu)
    for e in torch.unique(epoch).tolist():
        mask = epoch == e
        out[mask] = epoch_permutation(seed, e, dataset_len)[position[mask]]
    return out.reshape(g.shape).to(g.device)


def flip_mask(global_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Bool [b]: flip sample g horizontally iff uniform(seed, 0, g, DATA) < 0.5."""
    return rng.uniform(seed, FLIP_STEP, global_index, rng.Stream.DATA)[:, 0] < 0.5


def hflip(images: torch.Tensor, global_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Horizontal flip of the samples picked by `flip_mask` (returns a new tensor)."""
    mask = flip_mask(global_index, seed).to(images.device)
    return torch.where(mask.reshape(-1, 1, 1, 1), images.flip(-1), images)


def step_indices(step: int, global_batch: int, rank_offset: int, batch_size: int) -> torch.Tensor:
    """Global sample indices of this rank's chunk of `step`."""
    start = step * global_batch + rank_offset
    return torch.arange(start, start + batch_size, dtype=torch.int64)


# ----------------------------------------------------------------------------- loaders

def _check_slice(dataset, batch_size: int, global_batch: int, rank_offset: int) -> None:
    _check_int("batch_size", batch_size, 1)
    if rank_offset + batch_size > global_batch:
        raise ValueError(f"rank_offset + batch_size ({rank_offset} + {batch_size}) must be "
                         f"<= global_batch ({global_batch})")
    if len(dataset) < 1:
        raise ValueError("dataset is empty")


def _skipped(dataset, failures=()) -> int:
    return len(set(getattr(dataset, "skipped", [])) | set(failures))


class _StepBatches(Dataset):
    """Map-style view where item s is this rank's whole batch of step s (fetched in a worker)."""

    def __init__(self, dataset, batch_size, global_batch, rank_offset, seed, hflip_on):
        self.dataset, self.batch_size, self.global_batch = dataset, batch_size, global_batch
        self.rank_offset, self.seed, self.hflip_on = rank_offset, seed, hflip_on

    def __len__(self):  # never used for iteration (the sampler is infinite)
        return 2**62

    def __getitem__(self, step: int):
        gidx = step_indices(step, self.global_batch, self.rank_offset, self.batch_size)
        didx = sample_order(gidx, len(self.dataset), self.seed)
        failures = getattr(self.dataset, "load_failures", None)
        before = len(failures) if failures is not None else 0
        if hasattr(self.dataset, "load_batch"):
            images = self.dataset.load_batch(didx)
        else:   # any map-style dataset of tensors or (tensor, label) pairs
            items = [self.dataset[int(i)] for i in didx]
            images = torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])
        images = images.to(torch.float32)
        if self.hflip_on:
            images = hflip(images, gidx, self.seed)
        new_failures = list(failures[before:]) if failures is not None else []
        return step, gidx, images, new_failures


class _StepSampler(Sampler):
    def __init__(self, start_step: int):
        self.start_step = start_step

    def __iter__(self):
        return itertools.count(self.start_step)


def _ignore_stop_signals(_worker_id: int) -> None:
    """In loader worker processes: SIGTERM/SIGINT are the trainer's to handle (checkpoint, then
    exit). torchrun and a terminal send them to the whole process group; a worker killed by one
    would make the DataLoader raise before the trainer could save."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchLoader:
    """data.loader=torch, the reference. Yields (step, global_indices [b] CPU int64, images
    float32 [b, C, H, W] on `device`) for steps start_step, start_step + 1, … forever.

    batch_size is this rank's chunk of one step (all its micro-batches together) and global_batch
    the whole optimiser batch over all ranks; the chunk of step s is global indices
    s·global_batch + rank_offset + arange(batch_size), mapped to images by `sample_order`.
    workers > 0 prefetch whole batches in worker processes; workers = 0 loads in-process.
    """

    name = "torch"

    def __init__(self, dataset, *, batch_size: int, global_batch: int, rank_offset: int = 0,
                 seed: int, start_step: int = 0, hflip: bool = False, workers: int = 0,
                 device="cpu", pin_memory: bool = False):
        _check_slice(dataset, batch_size, global_batch, rank_offset)
        self.batch_size, self.global_batch, self.rank_offset = batch_size, global_batch, rank_offset
        self.seed, self.start_step, self.workers = seed, start_step, workers
        self.dataset = dataset
        self.hflip = bool(hflip)
        self.device = torch.device(device)
        # pinned host memory only helps (and only works) for copies to a CUDA device
        self.pin_memory = (bool(pin_memory) and self.device.type == "cuda"
                           and torch.cuda.is_available())
        self._load_failures: set[str] = set()

    @property
    def skipped_count(self) -> int:
        """Unreadable images: skipped when the dataset was scanned, plus any that failed later."""
        return _skipped(self.dataset, self._load_failures)

    def __iter__(self):
        batches = _StepBatches(self.dataset, self.batch_size, self.global_batch,
                               self.rank_offset, self.seed, self.hflip)
        data_loader = DataLoader(batches, batch_size=None, sampler=_StepSampler(self.start_step),
                                 num_workers=self.workers, pin_memory=self.pin_memory,
                                 prefetch_factor=2 if self.workers else None,
                                 worker_init_fn=_ignore_stop_signals if self.workers else None)
        non_blocking = self.pin_memory
        for step, gidx, images, failures in data_loader:
            new = set(failures) - self._load_failures
            if new:
                self._load_failures |= new
                log.warning("%d image(s) failed to load and were replaced (first: %s); "
                            "%d unreadable in total", len(new), sorted(new)[0], self.skipped_count)
            yield int(step), gidx, images.to(self.device, non_blocking=non_blocking)


def dali_status(dataset) -> tuple[bool, str]:
    """Whether data.loader=dali can read `dataset`, and why (not)."""
    from . import dali

    ok, why = dali.status()
    if not ok:
        return False, why
    if not isinstance(dataset, ImageFolderDataset):
        return False, "DALI reads image files: it needs data.dataset=folder"
    bad = [f for f in dataset.files if not f.lower().endswith(dali.EXTENSIONS)]
    if bad:
        return False, (f"DALI cannot decode {len(bad)} file(s) of the folder (first: {bad[0]}); "
                       f"agm-fast prepare converts them")
    return True, why


def choose_loader(cfg, dataset, device: torch.device) -> tuple[str, str]:
    """(loader, why) for cfg.data.loader on `device`. auto: memory when the set fits
    data.memory_budget_gb (and half the free host memory), else DALI on CUDA where it can run,
    else torch. An explicit choice that cannot run is a ConfigError naming the field and why."""
    d, cuda = cfg.data, torch.device(device).type == "cuda"
    want = check_choice("data.loader", d.loader)
    if want == "torch":
        return "torch", "data.loader=torch: the reference DataLoader"
    need, budget, free = stored_bytes(dataset), d.memory_budget_gb * 1e9, host_available_bytes()
    size = f"the set is {need / 1e6:.3g} MB"
    if want == "memory":
        if cuda and need <= budget:
            return "memory", f"data.loader=memory: {size}, on {device}"
        if need > free:
            raise ConfigError(f"data.loader=memory cannot run: {size} but {free / 1e6:.0f} MB of "
                              f"host memory is free; use data.loader=torch or dali")
        return "memory", (f"data.loader=memory: {size}, in pinned host memory (over data."
                          f"memory_budget_gb={d.memory_budget_gb:g})" if cuda else
                          f"data.loader=memory: {size}, in host memory")
    dali_ok, dali_why = dali_status(dataset)
    if want == "dali":
        if not dali_ok:
            raise ConfigError(f"data.loader=dali cannot run: {dali_why}")
        return "dali", f"data.loader=dali: {'GPU (mixed) decode' if cuda else 'CPU pipeline'}"
    if need <= budget and need <= free / 2:
        return "memory", f"auto: {size}, within data.memory_budget_gb={d.memory_budget_gb:g}"
    over = (f"{size}, over data.memory_budget_gb={d.memory_budget_gb:g}" if need > budget
            else f"{size}, over half the free host memory")
    if cuda and dali_ok:
        return "dali", f"auto: {over}; DALI decodes on the GPU"
    return "torch", f"auto: {over}; " + (f"no DALI: {dali_why}" if cuda else "DALI only on CUDA")


def make_loader(cfg, dataset, *, device: torch.device, start_step: int, rank: int = 0,
                world: int = 1):
    """The training loader of a config (data.*, train.batch_size, train.seed): this rank's
    contiguous slice of every step's global batch, on `device`. `choose_loader` picks the
    implementation; the choice and its reason are logged."""
    t, d = cfg.train, cfg.data
    name, why = choose_loader(cfg, dataset, device)
    log.info("data.loader: %s (%s)", name, why)
    per_rank = t.batch_size // world
    common = dict(batch_size=per_rank, global_batch=t.batch_size, rank_offset=rank * per_rank,
                  start_step=start_step, device=device)
    if name == "torch":
        return BatchLoader(dataset, seed=t.seed, hflip=d.hflip, workers=d.workers, pin_memory=True,
                           **common)
    _check_slice(dataset, per_rank, t.batch_size, rank * per_rank)
    order = functools.partial(sample_order, dataset_len=len(dataset), seed=t.seed)
    if name == "memory":
        return MemoryLoader(dataset, order=order, normalise=to_unit_range,
                            flip=functools.partial(hflip, seed=t.seed) if d.hflip else None,
                            budget_bytes=d.memory_budget_gb * 1e9, threads=d.workers, **common)
    from .dali import DaliLoader
    return DaliLoader(dataset.files, order=order,
                      flips=functools.partial(flip_mask, seed=t.seed) if d.hflip else None,
                      resolution=dataset.resolution, channels=dataset.channels,
                      threads=decode_threads(d.workers), seed=t.seed,
                      skipped=len(dataset.skipped), **common)
