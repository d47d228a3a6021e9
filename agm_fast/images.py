"""Image files: [-1, 1] tensors → uint8, PNG grids and .npz arrays, written atomically.

The trainer's sample grids, `agm-fast sample` and the evaluation all write through here, so a
grid from a run and a grid from the CLI are the same picture of the same tensors.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .files import atomic_write


def check_output_path(path, suffix: str) -> None:
    """The output file can be written: named *suffix, not a directory, its folder exists or can
    be made and is writable. Called before hours of sampling, not after."""
    path = os.fspath(path)
    if not path.lower().endswith(suffix):
        raise ValueError(f"{path}: the output file name must end in {suffix}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; give a file name ending in {suffix}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot create its folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{path}: folder {folder} is not writable")


def check_nrow(nrow) -> None:
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an integer ≥ 1; got {nrow!r}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → uint8 NHWC (values outside are clipped, NaN → 0)."""
    x = torch.nan_to_num(images.detach().float().cpu(), nan=-1.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def grid(arr: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 NHWC images → one uint8 H×W×C grid image, nrow images per row, black padding."""
    n, h, w, c = arr.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    out = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        out[y:y + h, x:x + w] = arr[i]
    return out


def write_png(arr: np.ndarray, path) -> None:
    """A uint8 H×W×C array (C = 1 grey, C = 3 RGB) as a PNG, written atomically."""
    from PIL import Image
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)  # uint8 2-D → "L", H×W×3 → "RGB"
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_grid(images: torch.Tensor, path, nrow: int | None = None, padding: int = 2) -> None:
    """PNG grid of images in [-1, 1] (C = 1 grey, C = 3 RGB), nrow images per row (default:
    a square), written atomically."""
    arr = to_uint8(images)
    n, c = arr.shape[0], arr.shape[3]
    if c not in (1, 3):
        raise ValueError(f"save_grid needs C = 1 (grey) or 3 (RGB) channels; got C={c}")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    check_nrow(nrow)
    write_png(grid(arr, nrow, padding), path)


def save_npz(images: torch.Tensor, path) -> None:
    """images in [-1, 1] → uint8 NHWC array under the key 'arr_0' (what FID tools read), atomically."""
    arr = to_uint8(images)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, arr_0=arr)
    atomic_write(path, write)
