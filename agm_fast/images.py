"""Image files: [-1, 1] tensors → uint8, PNG grids and .npz arrays, written atomically; and the one
conversion of a Pillow image into a square uint8 training image (`square_pixels`).

The trainer's sample grids, `agm-fast sample` and the evaluation all write through here, so a
grid from a run and a grid from the CLI are the same picture of the same tensors. `agm-fast prepare`
and the image-folder dataset both read images through `square_pixels`, so a prepared folder and the
folder it came from give the same pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write

REDUCING_GAP = 3.0  # JPEG draft + Image.reduce down to ≥ 3× the target, then Lanczos
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm")   # what a training folder and `prepare` read


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


def scan_image_files(root) -> tuple[list[str], int]:
    """Image files under `root` (recursive, symlinks followed once, hidden entries skipped), sorted
    on their "/"-separated relative paths (the same order on every machine), and the number of
    other files ignored."""
    root = Path(root)
    found, ignored, seen_dirs = [], 0, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:   # a symlink loop, or the same folder linked twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return sorted(found, key=lambda f: Path(f).relative_to(root).as_posix()), ignored


def square_pixels(im, resolution: int, channels: int) -> tuple[np.ndarray, bool]:
    """A Pillow image → uint8 [R, R] (channels 1) or [R, R, 3], and whether it was upscaled.

    EXIF orientation applied; 16/32-bit grey scaled to 8 bits (Pillow's convert would clip) and
    float images taken as [0, 1]; palette, CMYK, 1-bit and grey converted; any transparency
    composited on white; centre-cropped to a square, then resized with Lanczos (reducing_gap: a
    big JPEG is decoded at 1/2, 1/4 or 1/8 scale first)."""
    from PIL import Image, ImageOps

    im.seek(0)   # the first frame of an animated image
    im.draft(None, (int(resolution * REDUCING_GAP),) * 2)   # JPEG only; keeps ≥ 3× the target
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):   # 16/32-bit grey, float
        scale = 255.0 if im.mode == "F" else 1 / 257.0
        a = np.asarray(im, dtype=np.float64) * scale
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    im = im.convert("L" if channels == 1 else "RGB")

    width, height = im.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if width != height:   # crop first: resize(box=…) would blend in pixels outside the box
        im = im.crop((left, top, left + side, top + side))
    if side != resolution:
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS,
                       reducing_gap=REDUCING_GAP)
    return np.asarray(im, dtype=np.uint8).copy(), side < resolution
