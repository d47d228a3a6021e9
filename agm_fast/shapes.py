"""The procedural shapes dataset: the download-free default for tests and the demo.

Image i is a pure function of (seed, i, resolution, channels): nothing is read from or written
to disk. Its parameters are Philox uniforms of rng.Stream.DATA with the step word SHAPES_STEP
(docs/design.md §1 "Noise"), so they never collide with the data flips (step word 0).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from . import rng

SHAPES_STEP = 0x53484150  # "SHAP": the step word of the shape parameters within rng.Stream.DATA


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_channels(channels) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return channels


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
