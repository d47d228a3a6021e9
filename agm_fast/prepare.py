"""Dataset preparation: `agm-fast prepare SOURCE --out DIR --resolution R [--channels C]`.

This module owns turning a source into a *prepared folder*: R×R PNG files named by index
(000000.png, 000001.png, …) plus manifest.json, and the manifest's schema and checksum. The
sources (an image folder, "fashion-mnist", "emoji") are read by agm_fast.sources; every image is
converted here the same way: EXIF orientation applied, 16-bit scaled to 8-bit, palette / CMYK /
greyscale converted, transparency composited on white, centre cropped to a square and resized
with Lanczos (antialiased; reducing_gap 3, so big JPEGs are first reduced in the decoder).
Files that cannot be decoded are skipped and listed in the manifest with the reason.

The manifest is written last, through a temporary file and a rename: a folder without
manifest.json is not a finished prepare (a killed one leaves the INCOMPLETE marker instead).
Its checksum covers the decoded pixels, not the PNG bytes, so it does not depend on the PNG
encoder: sha256 over the concatenated sha256 digests of each image's uint8 pixels (row-major
H×W for C=1, H×W×3 for C=3), in index order. `load_prepared` reads a folder back and checks it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import __version__, sources
from .files import atomic_write_text
from .images import square_pixels

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "agm_fast-prepared-images/1"
INCOMPLETE_MARKER = "INCOMPLETE"       # present while a prepare writes into the folder
IMAGE_NAME_RE = re.compile(r"^[0-9]+\.png$")
MIN_NAME_DIGITS = 6

DECODER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")   # Pillow decoders of images.IMAGE_EXTENSIONS (by content, not name)
PARALLEL_FROM = 1000   # workers=None: convert on threads from this many images on



# ----------------------------------------------------------------------------- the entry point

def prepare(source, out_dir, resolution: int, channels: int | None = None, *,
            overwrite: bool = False, fashion_mnist_dir=None, emoji_package=None,
            cache_dir=None, workers: int | None = None, progress: bool = True) -> dict:
    """Write `out_dir`: the source's images as resolution×resolution PNGs + manifest.json.

    source: an image folder, or the name "fashion-mnist" or "emoji" (a folder with one of those
    names is given as a path, e.g. "./emoji" or a Path). channels: 1 (grey) or 3 (RGB); None
    means the source's own (1 for fashion-mnist, 3 otherwise). out_dir must be missing, empty,
    or a previous prepare's output (replaced); anything else is refused unless overwrite=True,
    which deletes its contents. workers: threads that decode (0: none; None: up to 8 for
    sources of PARALLEL_FROM images or more). Returns the manifest. Bad input raises ValueError
    with a one-line message; a file that does not decode is skipped and listed, not an error.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 0):
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")

    # read the source completely before the output folder is touched: a bad source changes nothing
    if isinstance(source, str) and source == "fashion-mnist":
        plan = sources.plan_fashion_mnist(fashion_mnist_dir)
    elif isinstance(source, str) and source == "emoji":
        plan = sources.plan_emoji(emoji_package, cache_dir)
    else:
        plan = sources.plan_folder(source, out_dir)
    if channels is None:
        channels = plan["channels"]

    out_dir = Path(out_dir)
    _clear_output_folder(out_dir, overwrite)
    atomic_write_text(out_dir / INCOMPLETE_MARKER,
                      "agm_fast prepare is writing this folder, or was stopped: it is complete "
                      "only when manifest.json exists. Run the same prepare again to finish it.\n")

    jobs = plan["jobs"]
    name_digits = max(MIN_NAME_DIGITS, len(str(len(jobs) - 1)))
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= PARALLEL_FROM else 0
    convert = functools.partial(convert_job, resolution=resolution, channels=channels)

    from tqdm import tqdm

    checksum = hashlib.sha256()
    written_from, skipped, upscaled = [], [], 0
    bar = tqdm(total=len(jobs), desc=f"prepare {plan['source']['kind']}", unit="img",
               disable=None if progress else True, mininterval=1.0)
    with bar:
        for label, png_bytes, pixel_digest, was_upscaled, reason in _run(convert, jobs, workers):
            bar.update(1)
            if reason is not None:
                skipped.append({"file": label, "reason": reason})
                continue
            name = f"{len(written_from):0{name_digits}d}.png"
            (out_dir / name).write_bytes(png_bytes)
            checksum.update(pixel_digest)
            written_from.append(label)
            upscaled += was_upscaled

    if not written_from:
        (out_dir / INCOMPLETE_MARKER).unlink()
        first = skipped[0]
        raise ValueError(f"none of the {len(skipped)} image files in {plan['source']['path']} "
                         f"could be read (first: {first['file']}: {first['reason']})")
    if skipped:
        log.warning("skipped %d of %d files that could not be read (listed in %s; first: %s: %s)",
                    len(skipped), len(jobs), out_dir / MANIFEST_NAME, skipped[0]["file"],
                    skipped[0]["reason"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "agm_fast_version": __version__,
        "count": len(written_from),
        "resolution": resolution,
        "channels": channels,
        "image_names": f"{{:0{name_digits}d}}.png",   # .format(index), index 0 … count-1
        "checksum": "sha256:" + checksum.hexdigest(),
        "checksum_of": "sha256 over the sha256 digests of each image's uint8 pixels "
                       "(row-major, HxW for 1 channel, HxWx3 for 3), in index order",
        "conversion": plan["conversion"],
        "upscaled": upscaled,
        "source": plan["source"],
        "skipped": skipped,
        "source_files": written_from if plan["list_sources"] else "see source",
    }
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    (out_dir / INCOMPLETE_MARKER).unlink()
    return manifest


def _run(convert, jobs, workers: int):
    """convert(job) for every job, results in job order; on `workers` threads when > 0 (Pillow
    and hashlib release the GIL while they decode, resize, encode and hash; threads need no
    __main__ guard in the caller's script, unlike processes). At most 4 × workers in flight."""
    if workers == 0 or len(jobs) < 2:
        yield from map(convert, jobs)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight = collections.deque()
        for job in jobs:
            in_flight.append(pool.submit(convert, job))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


# ----------------------------------------------------------------------------- one image

def convert_job(job, resolution: int, channels: int):
    """One source image → (label, png_bytes, pixel_sha256_digest, upscaled, None), or
    (label, None, None, False, reason) when it cannot be decoded. job = (label, payload) with
    payload a file path, the file's bytes, or a uint8 [H, W] array (grey)."""
    from PIL import Image

    label, payload = job
    try:
        if isinstance(payload, np.ndarray):
            pixels, upscaled = square_pixels(Image.fromarray(payload), resolution, channels)
        else:
            if isinstance(payload, bytes):
                size, file = len(payload), io.BytesIO(payload)
            else:
                size, file = os.path.getsize(payload), payload
            if size == 0:
                return label, None, None, False, "empty file (0 bytes)"
            with Image.open(file, formats=DECODER_FORMATS) as im:
                pixels, upscaled = square_pixels(im, resolution, channels)
    except Image.UnidentifiedImageError:
        return label, None, None, False, "not a PNG, JPEG, WebP, BMP, GIF, TIFF or PNM image (unrecognised content)"
    except Exception as e:  # Pillow raises many types for corrupt data; all mean "skip this file"
        message = str(e).replace(str(payload), "<file>") if isinstance(payload, str) else str(e)
        return label, None, None, False, f"cannot decode: {type(e).__name__}: {message}"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return label, buffer.getvalue(), hashlib.sha256(pixels.tobytes()).digest(), upscaled, None


# ----------------------------------------------------------------------------- the output folder

def read_manifest(folder):
    """The manifest of a prepared folder, or None when there is none (or not one of ours)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT \
        else None


def _clear_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Make out_dir an empty place to write into: create it, or empty a previous prepare's
    output (its manifest first, so it never looks complete meanwhile), or — only with
    overwrite — delete whatever is in it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    if not entries:
        return
    previous = read_manifest(out_dir) is not None or (out_dir / INCOMPLETE_MARKER).exists()
    if previous:
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for entry in entries:
            if IMAGE_NAME_RE.match(entry.name) and entry.is_file():
                entry.unlink()
        return
    if not overwrite:
        raise ValueError(f"--out {str(out_dir)!r} is not empty and is not a previous prepare's "
                         f"output; choose another folder or pass --overwrite to delete its contents")
    if out_dir.resolve() in (Path.home().resolve(), Path(out_dir.resolve().anchor)):
        raise ValueError(f"refusing to delete the contents of {str(out_dir)!r}")
    log.warning("--overwrite: deleting the %d entries in %s", len(entries), out_dir)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def load_prepared(folder, verify: bool = True) -> tuple[np.ndarray, dict]:
    """A prepared folder → (uint8 [N, R, R, C] images in index order, manifest). Every image
    must exist at the manifest's size, and with verify the checksum must match (ValueError)."""
    from PIL import Image

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{str(folder)!r} is not a complete prepared folder (no {MANIFEST_NAME} "
                         f"of format {MANIFEST_FORMAT}); run agm-fast prepare")
    count, resolution, channels = manifest["count"], manifest["resolution"], manifest["channels"]
    if not re.fullmatch(r"\{:0[0-9]+d\}\.png", str(manifest.get("image_names"))):
        raise ValueError(f"{str(folder)!r}: manifest image_names {manifest.get('image_names')!r} "
                         f"is not of the form {{:06d}}.png")
    images = np.empty((count, resolution, resolution, channels), dtype=np.uint8)
    checksum = hashlib.sha256()
    for i in range(count):
        path = folder / manifest["image_names"].format(i)
        try:
            with Image.open(path, formats=("PNG",)) as im:
                pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        except Exception as e:  # missing or damaged file: the folder is not what the manifest says
            raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        if pixels.shape[:2] != (resolution, resolution):
            raise ValueError(f"{path}: {pixels.shape[1]}×{pixels.shape[0]} pixels, the manifest "
                             f"says {resolution}×{resolution}")
        images[i] = pixels.reshape(resolution, resolution, channels)
        if verify:
            checksum.update(hashlib.sha256(pixels.tobytes()).digest())
    if verify and "sha256:" + checksum.hexdigest() != manifest["checksum"]:
        raise ValueError(f"{str(folder)!r}: the images do not match the manifest's checksum "
                         f"(changed after prepare?); run agm-fast prepare again")
    return images, manifest


# ----------------------------------------------------------------------------- CLI hooks

def add_arguments(parser) -> None:
    """The `agm-fast prepare` arguments, on an argparse (sub)parser."""
    parser.add_argument("source", help="an image folder (recursive: png, jpg, webp, gif, tiff, bmp, pnm…), "
                                       "'fashion-mnist' or 'emoji' (a folder named so: ./emoji)")
    parser.add_argument("--out", required=True, help="the folder to write (PNGs + manifest.json)")
    parser.add_argument("--resolution", type=int, required=True, help="output side in pixels")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="1 grey or 3 RGB (default: 1 for fashion-mnist, 3 otherwise)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the contents of a non-empty --out that is not a previous "
                             "prepare's output (a previous output is always replaced)")
    parser.add_argument("--fashion-mnist-dir", default=None,
                        help="folder with train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz "
                             f"(default: where the Debian package {sources.FASHION_MNIST_DEBIAN_PACKAGE} "
                             "put them)")
    parser.add_argument("--emoji-package", default=None,
                        help=f"{sources.EMOJI_PACKAGE}-{sources.EMOJI_VERSION}.tgz or its unpacked folder "
                             "(default: fetched once with npm pack into the cache folder)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the fetched emoji package is kept (default: the user cache)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (0: none; default: up to 8 for big sources)")


def run(args) -> int:
    """`agm-fast prepare` with add_arguments' parsed args. Errors a user can fix are ValueError
    (one line); the CLI prints them."""
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    manifest = prepare(args.source, args.out, args.resolution, args.channels,
                       overwrite=args.overwrite, fashion_mnist_dir=args.fashion_mnist_dir,
                       emoji_package=args.emoji_package, cache_dir=args.cache_dir,
                       workers=args.workers)
    skipped = len(manifest["skipped"])
    print(f"prepared {manifest['count']} images ({manifest['resolution']}×{manifest['resolution']}, "
          f"{manifest['channels']} channel{'s' if manifest['channels'] > 1 else ''}) in {args.out}"
          + (f"; skipped {skipped} unreadable file{'s' if skipped > 1 else ''} (see "
             f"{MANIFEST_NAME})" if skipped else "") + f"; checksum {manifest['checksum']}")
    return 0
