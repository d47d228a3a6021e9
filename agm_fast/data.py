"""Datasets and the deterministic batch loader (DESIGN.md §1 "Noise", §3 "data").

Two datasets, both giving float32 images in [-1, 1] shaped [C, H, W]:
  * ShapesDataset: procedural coloured shapes, a pure function of (seed, index). The default
    for tests and the download-free demo: nothing is read from or written to disk.
  * ImageFolderDataset: every image file under a folder (recursive), centre-cropped and resized.

Order is a pure function of the global sample index g (not of the world size): sample g belongs
to epoch g // N at position g % N of that epoch's seeded permutation. Step s with global batch B
trains on g ∈ [s·B, (s+1)·B); a rank or micro-batch takes a contiguous slice. So the data
position *is* the step, and resuming at step s reproduces the run exactly.

`data.loader`: "auto" and "torch" use torch.utils.data.DataLoader (workers prefetch whole
batches); "dali" (GPU decode) is reserved for later work.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import rng
from .config import check_choice

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm")

# Within rng.Stream.DATA the step word separates uses: 0 = flips (keyed by global sample index),
# SHAPES_STEP = the shape parameters of ShapesDataset (keyed by dataset index).
FLIP_STEP = 0
SHAPES_STEP = 0x53484150  # "SHAP"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return channels


# ----------------------------------------------------------------------------- shapes

class ShapesDataset(Dataset):
    """One or two antialiased upright shapes (disk, square, triangle) on a plain or gradient
    background, with random position, size and colour.

    Image i is a pure function of (seed, i, resolution, channels): its ~30 parameters are Philox
    uniforms keyed by (seed, SHAPES_STEP, i, Stream.DATA). Shapes are large and contrast with the
    background (light on dark or dark on light): chosen so that a small U-Net can learn them in a
    few thousand CPU steps, and so that a pixel-shuffled copy looks nothing like them. C = 1
    gives grey images. The parameters do not depend on the resolution: the same scene at any
    size. `render(indices)` draws a batch in one vectorised pass (10k images at 32² in ~1.3 s
    on 2 CPU cores).
    """

    # layout of the per-image uniforms (lane numbers); the tints follow, C per colour
    _POLARITY, _BG_LEVEL, _GRAD_ON, _GRAD_AMP, _GRAD_ANGLE, _TWO_SHAPES = range(6)
    _SHAPE0 = 6              # per shape: type, size, cx, cy, level
    _PER_SHAPE = 5

    def __init__(self, num_images: int, resolution: int = 32, channels: int = 3, seed: int = 0):
        self.num_images = _check_int("num_images", num_images, 1)
        self.resolution = _check_int("resolution", resolution, 1)
        self.channels = _check_channels(channels)
        self.seed = _check_int("seed", seed, 0)
        self.skipped: list[str] = []   # same interface as ImageFolderDataset
        self._tint0 = self._SHAPE0 + 2 * self._PER_SHAPE
        self._numel = self._tint0 + 3 * channels

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return self.render(torch.tensor([index]))[0]

    def load_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.render(indices)

    def render(self, indices, chunk: int = 1024) -> torch.Tensor:
        """Images for dataset indices [b] → float32 [b, C, R, R] in [-1, 1]."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_images):
            raise IndexError(f"indices must lie in [0, {self.num_images})")
        if idx.numel() <= chunk:
            return self._render(idx)
        return torch.cat([self._render(part) for part in idx.split(chunk)])

    def _render(self, idx: torch.Tensor) -> torch.Tensor:
        R, C, B = self.resolution, self.channels, idx.numel()
        u = rng.uniform(self.seed, SHAPES_STEP, idx, rng.Stream.DATA, numel=self._numel)

        def col(k):   # lane k of every image, shaped [B, 1, 1] to broadcast over pixels
            return u[:, k].reshape(B, 1, 1)

        # pixel centres in [0, 1]
        axis = (torch.arange(R, dtype=torch.float32) + 0.5) / R
        py, px = axis.reshape(1, R, 1), axis.reshape(1, 1, R)

        # background: dark (levels -0.9..-0.3) or light (0.3..0.9), a small per-channel tint,
        # and for half of the images a linear gradient along a random direction
        light_bg = col(self._POLARITY) < 0.5
        sign = torch.where(light_bg, 1.0, -1.0)
        bg_level = sign * (0.3 + 0.6 * col(self._BG_LEVEL))
        angle = 2 * math.pi * col(self._GRAD_ANGLE)
        ramp = (px - 0.5) * torch.cos(angle) + (py - 0.5) * torch.sin(angle)   # [-0.71, 0.71]
        grad = torch.where(col(self._GRAD_ON) < 0.5, 0.0, 0.4 * col(self._GRAD_AMP)) * ramp
        tints = u[:, self._tint0:self._tint0 + 3 * C].reshape(B, 3, C)          # bg, shape0, shape1
        bg = bg_level[:, None] + 0.4 * (tints[:, 0, :, None, None] - 0.5) + grad[:, None]
        image = bg.expand(B, C, R, R).clone()

        two = col(self._TWO_SHAPES) < 0.5
        for k in range(2):
            p = self._SHAPE0 + k * self._PER_SHAPE
            kind = (col(p) * 3).floor().clamp(max=2)           # 0 disk, 1 square, 2 triangle
            size = (0.30 - 0.08 * two.float()) * (0.55 + 0.45 * col(p + 1))   # "radius", /image
            cx = size + (1 - 2 * size) * col(p + 2)
            cy = size + (1 - 2 * size) * col(p + 3)
            # upright, axis-aligned shapes: rotations would make the demo far harder to learn
            qx, qy = px - cx, cy - py     # y up, so triangles point to the top of the image
            sdf = torch.where(kind == 0, _sdf_disk(qx, qy, size),
                              torch.where(kind == 1, _sdf_square(qx, qy, 0.85 * size),
                                          _sdf_triangle(qx, qy, 1.25 * size)))
            # one-pixel-wide antialiasing from the signed distance
            cover = (0.5 - sdf * R).clamp(0.0, 1.0)
            if k == 1:
                cover = cover * two
            # shape level on the opposite side of zero from the background
            level = -sign * (0.45 + 0.55 * col(p + 4))
            colour = level[:, None] + 0.8 * (tints[:, 1 + k, :, None, None] - 0.5)
            cover = cover[:, None]
            image = image + cover * (colour - image)
        return image.clamp_(-1.0, 1.0)


def _sdf_disk(qx, qy, r):
    return torch.sqrt(qx * qx + qy * qy) - r


def _sdf_square(qx, qy, half):
    ax, ay = qx.abs() - half, qy.abs() - half
    outside = torch.sqrt(ax.clamp(min=0) ** 2 + ay.clamp(min=0) ** 2)
    return outside + torch.maximum(ax, ay).clamp(max=0)


def _sdf_triangle(qx, qy, circumradius):
    """Equilateral triangle centred at 0 (exact signed distance, Quilez's formula)."""
    k = math.sqrt(3.0)
    r = circumradius * k / 2            # half the side length
    x = qx.abs() - r
    y = qy + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.maximum(x.clamp(max=0), -2 * r)     # x - clamp(x, -2r, 0)
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


# ----------------------------------------------------------------------------- image folder

class ImageFolderDataset(Dataset):
    """Every image file under `path` (recursive, sorted, hidden files skipped).

    Each image is centre-cropped to a square, resized to `resolution` (Lanczos) and converted to
    RGB (channels=3) or grey (channels=1) → float32 [-1, 1] [C, R, R]. Files Pillow cannot open
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
        candidates = _scan_images(self.path)
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
        index = int(index)
        n = len(self.files)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            try:
                return self._load(self.files[i])
            except Exception:
                self._bad.add(i)
                self.load_failures.append(self.files[i])
                log.warning("image %s failed to load; using the next readable image instead",
                            self.files[i])
        raise RuntimeError(f"none of the {n} images under {str(self.path)!r} could be loaded")

    def load_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices.reshape(-1)])

    def _load(self, file: str) -> torch.Tensor:
        from PIL import Image, ImageOps

        R = self.resolution
        with Image.open(file) as im:
            im.seek(0)   # first frame of animated gif/webp
            im = ImageOps.exif_transpose(im)   # camera photos store their rotation in EXIF
            im = _to_8bit(im).convert("RGB" if self.channels == 3 else "L")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            if w != h:   # crop first: resize(box=…) would blend in pixels outside the box
                im = im.crop((left, top, left + side, top + side))
            if side != R:
                im = im.resize((R, R), resample=Image.Resampling.LANCZOS)
            array = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(array.copy()).to(torch.float32)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        return x.mul_(2.0 / 255.0).sub_(1.0).contiguous()


def _to_8bit(im):
    """16/32-bit grey ('I;16', 'I') → 8-bit 'L' by scaling (Pillow's convert would clip)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("P", "PA") or "transparency" in im.info:
        return im.convert("RGBA")
    return im


def _scan_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    # sort on the path relative to the root with "/" separators: same order on every machine
    return sorted(found, key=lambda f: Path(f).relative_to(root).as_posix())


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


# ----------------------------------------------------------------------------- loader

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


class BatchLoader:
    """Yields (step, global_indices [b] CPU int64, images float32 [b, C, H, W] on `device`) for
    steps start_step, start_step + 1, … forever.

    batch_size is this rank's chunk of one step (all its micro-batches together) and global_batch
    the whole optimiser batch over all ranks; the chunk of step s is global indices
    s·global_batch + rank_offset + arange(batch_size), mapped to images by `sample_order`.
    workers > 0 prefetch whole batches in worker processes; workers = 0 loads in-process.
    """

    def __init__(self, dataset, *, batch_size: int, global_batch: int, rank_offset: int = 0,
                 seed: int, start_step: int = 0, hflip: bool = False, workers: int = 0,
                 device="cpu", pin_memory: bool = False, loader: str = "auto"):
        if check_choice("data.loader", loader) == "dali":
            raise ValueError("DALI loader not implemented yet: use loader='torch' or 'auto'")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.global_batch = _check_int("global_batch", global_batch, 1)
        self.rank_offset = _check_int("rank_offset", rank_offset, 0)
        if rank_offset + batch_size > global_batch:
            raise ValueError(f"rank_offset + batch_size ({rank_offset} + {batch_size}) must be "
                             f"<= global_batch ({global_batch})")
        self.seed = _check_int("seed", seed, 0)
        self.start_step = _check_int("start_step", start_step, 0)
        self.workers = _check_int("workers", workers, 0)
        if len(dataset) < 1:
            raise ValueError("dataset is empty")
        self.dataset = dataset
        self.hflip = bool(hflip)
        self.device = torch.device(device)
        # pinned host memory only helps (and only works) for copies to a CUDA device
        self.pin_memory = (bool(pin_memory) and self.device.type == "cuda"
                           and torch.cuda.is_available())
        self.loader = "torch"
        self._load_failures: set[str] = set()

    @property
    def skipped_count(self) -> int:
        """Unreadable images: skipped when the dataset was scanned, plus any that failed later."""
        return len(set(getattr(self.dataset, "skipped", [])) | self._load_failures)

    def __iter__(self):
        batches = _StepBatches(self.dataset, self.batch_size, self.global_batch,
                               self.rank_offset, self.seed, self.hflip)
        data_loader = DataLoader(batches, batch_size=None, sampler=_StepSampler(self.start_step),
                                 num_workers=self.workers, pin_memory=self.pin_memory,
                                 prefetch_factor=2 if self.workers else None)
        non_blocking = self.pin_memory
        for step, gidx, images, failures in data_loader:
            new = set(failures) - self._load_failures
            if new:
                self._load_failures |= new
                log.warning("%d image(s) failed to load and were replaced (first: %s); "
                            "%d unreadable in total", len(new), sorted(new)[0], self.skipped_count)
            yield int(step), gidx, images.to(self.device, non_blocking=non_blocking)
