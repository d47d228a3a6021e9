"""agm_fast.prepare: image folders, Fashion-MNIST idx files and the emoji package → a prepared
folder of PNGs + manifest.json. Every source is built here in its real format (small): no network,
no Debian package, no npm."""

import argparse
import gzip
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from agm_fast import __version__
from agm_fast import prepare as prep
from agm_fast import sources

RED, GREEN, BLUE, BLACK, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)


def solid(size, colour, mode="RGB"):
    return Image.new(mode, size, colour)


def outputs(folder):
    """The prepared images, uint8 [N, R, R, C], checked against the manifest's checksum."""
    images, manifest = prep.load_prepared(folder)
    return images, manifest


def write_png16_rgb(path, rgb16):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): uint16 [H, W, 3]."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def noise_png_bytes(size=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- image folders

@pytest.fixture
def mixed_folder(tmp_path):
    """Good images of several kinds among bad files, in a nested folder."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    solid((40, 30), RED).save(src / "a_red.png")
    solid((200, 150), BLUE).save(src / "b_blue.jpg", quality=95)
    solid((16, 16), (0, 255, 255, 0), mode="CMYK").save(src / "c_cmyk.jpg", quality=95)  # red ink
    solid((16, 16), 90, mode="L").save(src / "sub" / "d_grey.png")
    solid((16, 16), GREEN).save(src / "sub" / "e_green.webp", lossless=True)
    good = noise_png_bytes()
    (src / "f_truncated.png").write_bytes(good[: len(good) // 2])
    (src / "g_text.jpg").write_text("this is not a JPEG\n")
    (src / "h_empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("ignored: not an image extension\n")
    solid((8, 8), RED).save(src / ".hidden.png")
    return src


def test_folder_converts_good_files_and_lists_bad_ones(mixed_folder, tmp_path):
    out = tmp_path / "out"
    manifest = prep.prepare(mixed_folder, out, resolution=8)
    images, on_disk = outputs(out)
    assert on_disk == manifest
    assert manifest["count"] == 5 and images.shape == (5, 8, 8, 3)
    assert manifest["source_files"] == ["a_red.png", "b_blue.jpg", "c_cmyk.jpg", "sub/d_grey.png",
                                        "sub/e_green.webp"]
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"f_truncated.png", "g_text.jpg", "h_empty.png"}
    assert "empty" in reasons["h_empty.png"]
    assert "unrecognised content" in reasons["g_text.jpg"]
    assert "cannot decode" in reasons["f_truncated.png"]
    assert all(str(mixed_folder) not in r for r in reasons.values())   # reasons name no paths
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["manifest.json"]

    red, blue, cmyk, grey, green = images.astype(int)
    assert (red == RED).all() and (green == GREEN).all()
    assert np.abs(blue - BLUE).max() <= 3             # JPEG: within a few grey levels
    assert np.abs(cmyk - RED).max() <= 3              # CMYK (C=0, M=Y=100 %, K=0) → red
    assert (grey == 90).all()                         # grey → R = G = B


def test_manifest_schema(mixed_folder, tmp_path):
    manifest = prep.prepare(mixed_folder, tmp_path / "out", resolution=8, channels=1)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == prep.MANIFEST_FORMAT and manifest["agm_fast_version"] == __version__
    assert (manifest["count"], manifest["resolution"], manifest["channels"]) == (5, 8, 1)
    assert manifest["checksum"].startswith("sha256:") and len(manifest["checksum"]) == 7 + 64
    assert manifest["image_names"] == "{:06d}.png"
    assert manifest["source"]["kind"] == "folder"
    assert manifest["source"]["path"] == str(mixed_folder.resolve())
    assert manifest["source"]["image_files"] == 8 and manifest["source"]["other_files_ignored"] == 1
    assert all(set(s) == {"file", "reason"} for s in manifest["skipped"])
    assert not (tmp_path / "out" / prep.INCOMPLETE_MARKER).exists()
    images, _ = outputs(tmp_path / "out")
    assert images.shape == (5, 8, 8, 1)


def test_modes_are_converted_and_transparency_composited_on_white(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (255, 0, 0, 0)        # fully transparent red → white
    rgba[:, 2:] = (255, 0, 0, 128)      # half-transparent red → pink
    Image.fromarray(rgba, "RGBA").save(src / "a_rgba.png")
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (2, 0, 4, 4))      # left: index 0 (transparent black), right: index 1 (blue)
    palette.save(src / "b_palette.png", transparency=0)
    grey_alpha = np.zeros((4, 4, 2), np.uint8)
    grey_alpha[:, :2] = (50, 0)         # transparent → white
    grey_alpha[:, 2:] = (50, 255)       # opaque grey 50
    Image.fromarray(grey_alpha, "LA").save(src / "c_grey_alpha.png")
    Image.fromarray(np.full((4, 4), 0xC0C0, np.uint16)).save(src / "d_grey16.png")   # 16-bit grey
    rgb16 = np.empty((4, 4, 3), np.uint16)
    rgb16[...] = (0xC0C0, 0x4040, 0x8080)
    write_png16_rgb(src / "e_rgb16.png", rgb16)
    Image.new("1", (4, 4), 1).save(src / "f_bilevel.png")

    manifest = prep.prepare(src, tmp_path / "out", resolution=4)
    assert manifest["count"] == 6 and manifest["skipped"] == []
    rgba_out, palette_out, grey_alpha_out, grey16_out, rgb16_out, bilevel_out = \
        outputs(tmp_path / "out")[0].astype(int)
    assert (rgba_out[:, :2] == WHITE).all()
    assert np.abs(rgba_out[:, 2:] - (255, 127, 127)).max() <= 1
    assert (palette_out[:, :2] == WHITE).all() and (palette_out[:, 2:] == BLUE).all()
    assert (grey_alpha_out[:, :2] == WHITE).all() and (grey_alpha_out[:, 2:] == 50).all()
    assert (grey16_out == 192).all()                      # 0xC0C0 / 257, not clipped to 255
    assert (rgb16_out == (192, 64, 128)).all()
    assert (bilevel_out == 255).all()

    prep.prepare(src, tmp_path / "grey", resolution=4, channels=1)
    grey = outputs(tmp_path / "grey")[0][..., 0].astype(int)
    assert (grey[0, :, :2] == 255).all() and (grey[2, :, :2] == 255).all()   # white stays white
    assert (grey[2, :, 2:] == 50).all() and (grey[3] == 192).all()


def test_folder_dataset_reads_images_as_prepare_converts_them(tmp_path):
    """One conversion (agm_fast.images.square_pixels): training on a folder and on its prepared
    copy sees the same pixels, transparency, 16-bit, float, palette and JPEG included."""
    from agm_fast.data import ImageFolderDataset

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (10, 14, 4), dtype=np.uint8)   # wide: centre-cropped
    Image.fromarray(rgba, "RGBA").save(src / "a_rgba.png")
    Image.fromarray(rng.integers(0, 65536, (9, 9), dtype=np.uint16)).save(src / "b_grey16.png")
    Image.fromarray(rng.random((12, 8)).astype(np.float32), "F").save(src / "c_float.tiff")
    palette = Image.fromarray(rng.integers(0, 4, (8, 8), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(src / "d_palette.png", transparency=0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(src / "e_photo.jpg", quality=90)
    for channels in (1, 3):
        out = tmp_path / f"out{channels}"
        manifest = prep.prepare(src, out, resolution=6, channels=channels)
        assert manifest["count"] == 5 and manifest["skipped"] == []
        prepared = outputs(out)[0]
        folder = ImageFolderDataset(src, resolution=6, channels=channels)
        assert len(folder) == 5
        for i, expected in enumerate(prepared):
            got = folder.load_uint8(i).numpy()
            got = got.transpose(1, 2, 0)   # [C, R, R] → [R, R, C] as prepared
            np.testing.assert_array_equal(got, expected, err_msg=f"{folder.files[i]}, channels={channels}")


def test_centre_crop_keeps_the_middle(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wide = np.zeros((4, 14, 3), np.uint8)   # 14 wide: 5 red | 4 green | 5 blue
    wide[:, :5], wide[:, 5:9], wide[:, 9:] = RED, GREEN, BLUE
    Image.fromarray(wide).save(src / "a_wide.png")
    Image.fromarray(wide.transpose(1, 0, 2).copy()).save(src / "b_tall.png")   # 5 red / 4 green / 5 blue
    prep.prepare(src, tmp_path / "out", resolution=4)
    images = outputs(tmp_path / "out")[0]
    assert (images == GREEN).all()


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = RED                       # stored: red left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 6                           # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(src / "photo.png", exif=exif.tobytes())
    prep.prepare(src, tmp_path / "out", resolution=10)
    image = outputs(tmp_path / "out")[0][0]
    assert (image[:5] == RED).all() and (image[5:] == BLACK).all()   # displayed: red on top


def test_resize_is_antialiased(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).save(src / "checker.png")
    solid((100, 60), BLUE).save(src / "small_blue.png")
    manifest = prep.prepare(src, tmp_path / "out", resolution=8, channels=1)
    images = outputs(tmp_path / "out")[0][..., 0].astype(int)
    assert np.abs(images[0] - 127.5).max() < 10    # 1-pixel checks average to mid grey
    assert manifest["upscaled"] == 0
    prep.prepare(src, tmp_path / "up", resolution=64, channels=3)
    assert prep.read_manifest(tmp_path / "up")["upscaled"] == 1   # the 60-pixel side grew to 64


def test_same_source_gives_the_same_checksum(mixed_folder, tmp_path):
    first = prep.prepare(mixed_folder, tmp_path / "one", resolution=8, workers=0)
    second = prep.prepare(mixed_folder, tmp_path / "two", resolution=8, workers=3)
    again = prep.prepare(mixed_folder, tmp_path / "one", resolution=8)   # replaces its own output
    assert first["checksum"] == second["checksum"] == again["checksum"]
    assert first["skipped"] == second["skipped"]
    other = prep.prepare(mixed_folder, tmp_path / "three", resolution=9)
    assert other["checksum"] != first["checksum"]
    # the checksum is over pixels: a changed image no longer matches
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "000002.png")
    with pytest.raises(ValueError, match="checksum"):
        prep.load_prepared(tmp_path / "one")


@pytest.mark.parametrize("make", ["missing", "empty", "no_images", "file"])
def test_bad_source_is_a_one_line_error_naming_it(tmp_path, make):
    src = tmp_path / "src"
    if make in ("empty", "no_images"):
        src.mkdir()
    if make == "no_images":
        (src / "readme.txt").write_text("no images here")
    if make == "file":
        src.write_text("a file")
    with pytest.raises(ValueError) as error:
        prep.prepare(src, tmp_path / "out", resolution=8)
    assert str(src) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()   # nothing written for a bad source


def test_all_files_unreadable_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.jpg").write_text("text")
    with pytest.raises(ValueError, match="none of the 2 image files"):
        prep.prepare(src, tmp_path / "out", resolution=8)
    assert prep.read_manifest(tmp_path / "out") is None


def test_output_folder_rules(mixed_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not empty") as error:
        prep.prepare(mixed_folder, out, resolution=8)
    assert str(out) in str(error.value) and (out / "precious.txt").exists()
    prep.prepare(mixed_folder, out, resolution=8, overwrite=True)
    assert not (out / "precious.txt").exists()

    # a previous prepare's output is replaced without overwrite, stale images included
    bigger = tmp_path / "bigger"
    (bigger / "x").mkdir(parents=True)
    for i in range(7):
        solid((8, 8), (i, i, i)).save(bigger / "x" / f"{i}.png")
    assert prep.prepare(bigger, out, resolution=8)["count"] == 7
    manifest = prep.prepare(mixed_folder, out, resolution=8)
    assert manifest["count"] == 5
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]

    with pytest.raises(ValueError, match="outside the source"):
        prep.prepare(mixed_folder, mixed_folder / "prepared", resolution=8)
    with pytest.raises(ValueError, match="outside the source"):
        prep.prepare(mixed_folder, mixed_folder, resolution=8, overwrite=True)
    assert (mixed_folder / "a_red.png").exists()


def test_a_killed_prepare_does_not_look_complete(mixed_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prep.prepare(mixed_folder, out, resolution=8)   # a complete earlier output is being replaced
    real_convert, calls = prep.convert_job, []

    def convert_then_die(job, **kwargs):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_convert(job, **kwargs)

    monkeypatch.setattr(prep, "convert_job", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(mixed_folder, out, resolution=8, workers=0)
    assert not (out / "manifest.json").exists() and (out / prep.INCOMPLETE_MARKER).exists()
    assert prep.read_manifest(out) is None
    with pytest.raises(ValueError, match="not a complete prepared folder"):
        prep.load_prepared(out)
    monkeypatch.setattr(prep, "convert_job", real_convert)
    assert prep.prepare(mixed_folder, out, resolution=8)["count"] == 5   # no overwrite needed
    assert not (out / prep.INCOMPLETE_MARKER).exists()


def test_cli_hooks(mixed_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    args = parser.parse_args([str(mixed_folder), "--out", str(tmp_path / "out"), "--resolution", "8",
                              "--channels", "1", "--workers", "0"])
    assert prep.run(args) == 0
    printed = capsys.readouterr().out
    assert "prepared 5 images (8×8, 1 channel)" in printed and "skipped 3" in printed
    with pytest.raises(SystemExit):
        parser.parse_args([str(mixed_folder), "--out", "x", "--resolution", "8", "--channels", "2"])


# ----------------------------------------------------------------------------- fashion-mnist

def idx_images_bytes(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">BBBBIII", 0, 0, 0x08, 3, n, rows, cols) + images.astype(np.uint8).tobytes()


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "fashion"
    folder.mkdir()
    train, test = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images_bytes(train)))
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images_bytes(test)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + b"\0" * 7))
    return folder, np.concatenate([train, test]).astype(np.uint8)


def test_fashion_mnist_kept_exactly_at_28(fashion_dir, tmp_path):
    folder, expected = fashion_dir
    manifest = prep.prepare("fashion-mnist", tmp_path / "out", resolution=28, fashion_mnist_dir=folder)
    assert (manifest["count"], manifest["channels"], manifest["resolution"]) == (5, 1, 28)
    assert [f["images"] for f in manifest["source"]["files"]] == [3, 2]
    images = outputs(tmp_path / "out")[0]
    assert np.array_equal(images[..., 0], expected)   # train then t10k, pixels unchanged

    prep.prepare("fashion-mnist", tmp_path / "rgb32", resolution=32, channels=3,
                 fashion_mnist_dir=folder)
    rgb = outputs(tmp_path / "rgb32")[0]
    assert rgb.shape == (5, 32, 32, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], "not unsigned-byte images"),     # idx1 (labels)
    (lambda raw: b"PK\x03\x04" + raw[4:], "not an idx file"),
    (lambda raw: raw[:-5], "header says 3 images of 28×28"),
    (lambda raw: raw[:10], "header truncated"),
])
def test_fashion_mnist_bad_header_is_a_clear_error(fashion_dir, tmp_path, damage, message):
    folder, _ = fashion_dir
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    with pytest.raises(ValueError, match=message) as error:
        prep.prepare("fashion-mnist", tmp_path / "out", resolution=28, fashion_mnist_dir=folder)
    assert str(path) in str(error.value)


def test_fashion_mnist_missing_files_are_clear_errors(fashion_dir, tmp_path, monkeypatch):
    folder, _ = fashion_dir
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        prep.prepare("fashion-mnist", tmp_path / "out", resolution=28, fashion_mnist_dir=folder)
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz not found"):
        prep.prepare("fashion-mnist", tmp_path / "out", resolution=28, fashion_mnist_dir=folder)
    with pytest.raises(ValueError, match="does not exist"):
        prep.prepare("fashion-mnist", tmp_path / "out", resolution=28, fashion_mnist_dir=tmp_path / "no")
    monkeypatch.setattr(shutil, "which", lambda name: None)    # no dpkg: say what to pass
    with pytest.raises(ValueError, match="--fashion-mnist-dir"):
        prep.prepare("fashion-mnist", tmp_path / "out", resolution=28)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- emoji

def emoji_png(colour, seed):
    """64×64 RGBA like the package's: a coloured disc on transparency, antialiased edge."""
    yy, xx = np.mgrid[:64, :64]
    alpha = np.clip(28.0 - np.hypot(yy - 31.5, xx - 31.5), 0, 1) * 255
    alpha[0, 0] = 128 if seed else 0
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = colour, np.round(alpha)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


EMOJI = {"1f600.png": RED, "0023-fe0f-20e3.png": GREEN, "1f9d1-200d-1f680.png": BLUE}


@pytest.fixture
def emoji_tgz(tmp_path):
    path = tmp_path / "emoji-datasource-google-16.0.0.tgz"
    files = {f"package/img/google/64/{name}": emoji_png(colour, i)
             for i, (name, colour) in enumerate(EMOJI.items())}
    files["package/img/google/sheets-256/64.png"] = emoji_png(BLACK, 0)   # not an emoji image
    files["package/package.json"] = json.dumps({"name": "emoji-datasource-google",
                                                "version": "16.0.0"}).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_emoji_from_tarball_composited_on_white(emoji_tgz, tmp_path):
    manifest = prep.prepare("emoji", tmp_path / "out", resolution=64, emoji_package=emoji_tgz)
    assert (manifest["count"], manifest["channels"]) == (3, 3)
    assert manifest["source_files"] == ["img/google/64/" + n for n in sorted(EMOJI)]
    assert manifest["source"]["integrity"] == sources.npm_integrity(emoji_tgz.read_bytes())
    images = outputs(tmp_path / "out")[0].astype(int)
    for image, name in zip(images, sorted(EMOJI)):
        assert (image[32, 32] == EMOJI[name]).all()     # opaque: the colour itself
        assert (image[63, 63] == WHITE).all()           # transparent: white, not the hidden colour
    # seed 1 and 2 have alpha 128 in the corner: half-way between the colour and white
    green_corner = images[0, 0, 0]                    # 0023… (GREEN, seed 1) sorts first
    assert np.abs(green_corner - (127, 255, 127)).max() <= 1

    unpacked = tmp_path / "unpacked"
    with tarfile.open(emoji_tgz) as tar:
        tar.extractall(unpacked, filter="data")
    again = prep.prepare("emoji", tmp_path / "again", resolution=64, emoji_package=unpacked)
    assert again["checksum"] == manifest["checksum"]
    small = prep.prepare("emoji", tmp_path / "small", resolution=16, emoji_package=emoji_tgz)
    assert outputs(tmp_path / "small")[0].shape == (3, 16, 16, 3) and small["upscaled"] == 0


def test_emoji_bad_package_is_a_clear_error(tmp_path):
    not_tgz = tmp_path / "x.tgz"
    not_tgz.write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="not a readable .tgz"):
        prep.prepare("emoji", tmp_path / "out", resolution=64, emoji_package=not_tgz)
    with pytest.raises(ValueError, match="does not exist"):
        prep.prepare("emoji", tmp_path / "out", resolution=64, emoji_package=tmp_path / "nope.tgz")
    with pytest.raises(ValueError, match="not an unpacked"):
        prep.prepare("emoji", tmp_path / "out", resolution=64, emoji_package=tmp_path)


def fake_npm(bin_dir, script):
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def test_emoji_fetch_without_npm_or_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ValueError, match="needs npm.*--emoji-package"):
        prep.prepare("emoji", tmp_path / "out", resolution=64, cache_dir=tmp_path / "cache")
    failing = "echo 'npm ERR! code ENOTFOUND' >&2\necho 'npm ERR! network request failed' >&2\nexit 1\n"
    monkeypatch.setenv("PATH", fake_npm(tmp_path / "bin", failing))
    with pytest.raises(ValueError, match="failed \\(exit 1\\): npm ERR! code ENOTFOUND") as error:
        prep.prepare("emoji", tmp_path / "out", resolution=64, cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_emoji_fetch_with_npm_pack_is_pinned_and_cached(emoji_tgz, tmp_path, monkeypatch):
    """A stand-in npm that 'packs' the test tarball into its working folder, as npm pack does."""
    log = tmp_path / "npm-calls"
    script = f'echo "$@" >> "{log}"\ncp "{emoji_tgz}" ./emoji-datasource-google-16.0.0.tgz\n'
    monkeypatch.setenv("PATH", fake_npm(tmp_path / "bin", script) + os.pathsep + os.environ["PATH"])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not the pinned"):     # the real pin: a different tarball
        prep.prepare("emoji", tmp_path / "out", resolution=64, cache_dir=cache)
    monkeypatch.setattr(sources, "EMOJI_INTEGRITY", sources.npm_integrity(emoji_tgz.read_bytes()))
    manifest = prep.prepare("emoji", tmp_path / "out", resolution=64, cache_dir=cache)
    assert manifest["count"] == 3
    assert log.read_text().split("\n")[0] == "pack emoji-datasource-google@16.0.0 --ignore-scripts"
    assert (cache / "emoji-datasource-google-16.0.0.tgz").is_file()
    assert [p.name for p in cache.iterdir()] == ["emoji-datasource-google-16.0.0.tgz"]
    calls = len(log.read_text().splitlines())
    again = prep.prepare("emoji", tmp_path / "out", resolution=64, cache_dir=cache)
    assert len(log.read_text().splitlines()) == calls       # the cached tarball is reused
    assert again["checksum"] == manifest["checksum"]


def test_agm_fast_prepare_command(mixed_folder, tmp_path, capsys):
    from agm_fast.cli import main
    out = tmp_path / "prepared"
    assert main(["prepare", str(mixed_folder), "--out", str(out), "--resolution", "8"]) == 0
    assert (out / "manifest.json").exists() and "prepared" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--resolution", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agm-fast prepare: error:") and "does not exist" in err and len(err.splitlines()) == 1
