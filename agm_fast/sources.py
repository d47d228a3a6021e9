"""The sources `agm-fast prepare` reads, each turned into a plan of conversion jobs.

  * plan_folder: an image folder, recursive (agm_fast.images.IMAGE_EXTENSIONS), in sorted "/"-separated
    relative-path order, so the same on every machine.
  * plan_fashion_mnist: the standard idx files (train, then t10k), by default from the folder the
    Debian package dataset-fashion-mnist installs (found with `dpkg -L`).
  * plan_emoji: the 64×64 PNGs of the npm package emoji-datasource-google (pinned version and
    sha512 integrity), fetched once with `npm pack` into a cache folder, or a given .tgz or
    unpacked folder.
A plan is a dict: the manifest's "source" record, the channels, the jobs ((name, what to read)
pairs that agm_fast.prepare converts), and a description of the conversion. Errors a user can
fix are one-line ValueErrors naming the path.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, scan_image_files

log = logging.getLogger(__name__)

FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"

EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_VERSION = "16.0.0"
EMOJI_IMAGE_DIR = "img/google/64"
# npm's integrity string for emoji-datasource-google-16.0.0.tgz (sha512, base64)
EMOJI_INTEGRITY = ("sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4Qx"
                   "ZkOPJCoT8DlPhfQ3A==")
NPM_TIMEOUT_S = 900


def plan_folder(source, out_dir) -> dict:
    root = Path(source)
    kinds = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
    if not root.exists():
        raise ValueError(f"source folder {str(root)!r} does not exist (give an image folder, "
                         f"'fashion-mnist' or 'emoji')")
    if not root.is_dir():
        raise ValueError(f"source {str(root)!r} is a file, not a folder of images ({kinds})")
    root_real, out_real = root.resolve(), Path(out_dir).resolve()
    if out_real == root_real or root_real in out_real.parents or out_real in root_real.parents:
        raise ValueError(f"--out {str(out_dir)!r} must lie outside the source folder "
                         f"{str(root)!r} and must not contain it")

    files, ignored = scan_image_files(root)
    if not files:
        raise ValueError(f"no image files ({kinds}) found under {str(root)!r}")
    relative = {f: Path(f).relative_to(root).as_posix() for f in files}
    return {
        "source": {"kind": "folder", "path": str(root_real), "image_files": len(files),
                   "other_files_ignored": ignored},
        "channels": 3,
        "jobs": [(relative[f], f) for f in files],
        "list_sources": True,
        "conversion": "EXIF orientation applied, 16-bit scaled to 8-bit, transparency composited "
                      "on white, centre crop to a square, Lanczos resize (reducing_gap 3)",
    }


def plan_fashion_mnist(fashion_mnist_dir) -> dict:
    folder = Path(fashion_mnist_dir) if fashion_mnist_dir else _find_fashion_mnist()
    if not folder.is_dir():
        raise ValueError(f"Fashion-MNIST folder {str(folder)!r} does not exist")
    jobs, files = [], []
    for name in FASHION_MNIST_FILES:
        path = folder / name
        if not path.is_file() and (folder / name[:-3]).is_file():   # already gunzipped
            path = folder / name[:-3]
        if not path.is_file():
            raise ValueError(f"Fashion-MNIST file {name} not found in {str(folder)!r} (expected "
                             f"{' and '.join(FASHION_MNIST_FILES)})")
        raw = path.read_bytes()
        images = read_idx_images(raw, path)
        files.append({"name": path.name, "images": len(images),
                      "sha256": hashlib.sha256(raw).hexdigest()})
        jobs += [(f"{path.name}[{i}]", image) for i, image in enumerate(images)]
    return {
        "source": {"kind": "fashion-mnist", "path": str(folder.resolve()), "files": files,
                   "order": "the train file's images in file order, then the t10k file's"},
        "channels": 1,
        "jobs": jobs,
        "list_sources": False,
        "conversion": "28x28 grey kept as is at resolution 28, else Lanczos resize",
    }


def _find_fashion_mnist() -> Path:
    hint = (f"pass --fashion-mnist-dir DIR (the folder holding {' and '.join(FASHION_MNIST_FILES)}) "
            f"or install the Debian package {FASHION_MNIST_DEBIAN_PACKAGE}")
    if shutil.which("dpkg") is None:
        raise ValueError(f"Fashion-MNIST files not found: {hint}")
    listing = subprocess.run(["dpkg", "-L", FASHION_MNIST_DEBIAN_PACKAGE], capture_output=True,
                             text=True, timeout=60)
    for line in listing.stdout.splitlines() if listing.returncode == 0 else []:
        if line.strip().endswith("/" + FASHION_MNIST_FILES[0]):
            return Path(line.strip()).parent
    raise ValueError(f"Fashion-MNIST files not found ({FASHION_MNIST_DEBIAN_PACKAGE} is not "
                     f"installed): {hint}")


def read_idx_images(raw: bytes, path) -> np.ndarray:
    """An idx3-ubyte file (gzipped or not) → uint8 [N, rows, cols]; ValueError naming `path`
    for anything that is not one (magic number, dimensions, length all checked)."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic number {raw[:4].hex() or 'missing'}, "
                         f"expected 00000803)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08 or ndim != 3:
        raise ValueError(f"{path}: idx magic 0000{dtype_code:02x}{ndim:02x} is not unsigned-byte "
                         f"images (expected 00000803: type 0x08, 3 dimensions)")
    if len(raw) < 16:
        raise ValueError(f"{path}: idx header truncated ({len(raw)} bytes, expected 16)")
    count, rows, cols = (int(d) for d in np.frombuffer(raw, dtype=">u4", count=3, offset=4))
    if rows < 1 or cols < 1:
        raise ValueError(f"{path}: idx header gives images of {rows}×{cols} pixels")
    expected = 16 + count * rows * cols
    if len(raw) != expected:
        raise ValueError(f"{path}: idx header says {count} images of {rows}×{cols} "
                         f"({expected} bytes) but the data has {len(raw)} bytes")
    if count == 0:
        raise ValueError(f"{path}: idx file holds no images")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def plan_emoji(emoji_package, cache_dir) -> dict:
    if emoji_package is not None:
        package = Path(emoji_package)
        if not package.exists():
            raise ValueError(f"emoji package {str(package)!r} does not exist (give the .tgz that "
                             f"`npm pack {EMOJI_PACKAGE}@{EMOJI_VERSION}` writes, or its unpacked "
                             f"folder)")
    else:
        package = _fetch_emoji_package(cache_dir)

    source = {"kind": "emoji", "package": f"{EMOJI_PACKAGE}@{EMOJI_VERSION}",
              "path": str(package.resolve())}
    if package.is_dir():
        images = _emoji_images_from_folder(package)
    else:
        images = _emoji_images_from_tarball(package)
        integrity = npm_integrity(package.read_bytes())
        source["integrity"] = integrity
        if integrity != EMOJI_INTEGRITY:
            log.warning("%s is not the pinned %s@%s tarball (integrity %s); preparing it anyway",
                        package, EMOJI_PACKAGE, EMOJI_VERSION, integrity)
    source["image_files"] = len(images)
    return {
        "source": source,
        "channels": 3,
        "jobs": images,
        "list_sources": True,
        "conversion": "64x64 RGBA composited on white; Lanczos resize when resolution is not 64",
    }


def _emoji_images_from_tarball(path: Path) -> list:
    prefix = f"package/{EMOJI_IMAGE_DIR}/"
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()
                              and m.name.startswith(prefix) and m.name.endswith(".png")
                              and "/" not in m.name[len(prefix):]), key=lambda m: m.name)
            images = [(m.name[len("package/"):], tar.extractfile(m).read()) for m in members]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .tgz ({e})") from None
    if not images:
        raise ValueError(f"{path}: no {prefix}*.png in the tarball (not an {EMOJI_PACKAGE} package)")
    return images


def _emoji_images_from_folder(folder: Path) -> list:
    for image_dir in (folder / "package" / EMOJI_IMAGE_DIR, folder / EMOJI_IMAGE_DIR):
        if image_dir.is_dir():
            files = sorted(p for p in image_dir.iterdir() if p.suffix == ".png" and p.is_file())
            if files:
                return [(f"{EMOJI_IMAGE_DIR}/{p.name}", str(p)) for p in files]
    raise ValueError(f"{str(folder)!r}: no {EMOJI_IMAGE_DIR}/*.png inside (not an unpacked "
                     f"{EMOJI_PACKAGE} package)")


def _fetch_emoji_package(cache_dir) -> Path:
    """The pinned tarball in the cache folder; fetched with `npm pack` when missing there."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agm_fast"
    cache_dir = Path(cache_dir)
    tarball = cache_dir / f"{EMOJI_PACKAGE}-{EMOJI_VERSION}.tgz"
    if tarball.is_file() and npm_integrity(tarball.read_bytes()) == EMOJI_INTEGRITY:
        return tarball

    spec = f"{EMOJI_PACKAGE}@{EMOJI_VERSION}"
    offline_hint = f"or pass --emoji-package PATH to a copy of {tarball.name} made elsewhere"
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError(f"the emoji source needs npm to fetch {spec} (install Node.js and npm), "
                         f"{offline_hint}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s with npm pack into %s", spec, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as work:
        try:
            result = subprocess.run([npm, "pack", spec, "--ignore-scripts"], cwd=work,
                                    capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ValueError(f"`npm pack {spec}` did not finish in {NPM_TIMEOUT_S} s; "
                             f"check the network, {offline_hint}") from None
        except OSError as e:
            raise ValueError(f"could not run npm ({e.strerror}); {offline_hint}") from None
        fetched = sorted(Path(work).glob("*.tgz"))
        if result.returncode != 0 or len(fetched) != 1:
            lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "ERR" in ln] or lines
            why = " | ".join(errors[:3]) if errors else "no output"
            raise ValueError(f"`npm pack {spec}` failed (exit {result.returncode}): {why}; "
                             f"check the network, {offline_hint}")
        integrity = npm_integrity(fetched[0].read_bytes())
        if integrity != EMOJI_INTEGRITY:
            raise ValueError(f"`npm pack {spec}` gave a tarball with integrity {integrity}, not "
                             f"the pinned {EMOJI_INTEGRITY}")
        os.replace(fetched[0], tarball)
    return tarball


def npm_integrity(data: bytes) -> str:
    """npm's integrity string for a tarball: "sha512-" + base64 of the sha512 digest."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
