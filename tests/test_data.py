"""Datasets, deterministic order and the batch loader (agm_fast/data.py)."""

import itertools
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from agm_fast import data
from agm_fast.data import BatchLoader, ImageFolderDataset, ShapesDataset, make_dataset, sample_order


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("channels,resolution", [(3, 32), (1, 32), (1, 28), (3, 17)])
def test_shapes_shape_range_dtype(channels, resolution):
    ds = ShapesDataset(64, resolution=resolution, channels=channels, seed=0)
    x = ds.render(torch.arange(64))
    assert x.shape == (64, channels, resolution, resolution) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert ds[5].shape == (channels, resolution, resolution)


def test_shapes_pure_function_of_seed_and_index():
    a = ShapesDataset(50, seed=7)
    b = ShapesDataset(50, seed=7)
    batch = a.render(torch.tensor([3, 11, 42]))
    # the same image alone, in another batch, from another instance
    assert torch.equal(a[11], batch[1])
    assert torch.equal(b.render(torch.tensor([42, 3]))[1], batch[0])
    assert not torch.equal(a[3], a[4])
    assert not torch.equal(a[3], ShapesDataset(50, seed=8)[3])


def test_shapes_are_structured_and_varied():
    x = ShapesDataset(256, resolution=32, channels=3, seed=0).render(torch.arange(256))
    per_image_std = x.std(dim=(1, 2, 3))
    # every image has a shape that contrasts with its background (never a blank image)
    assert float(per_image_std.min()) > 0.1
    # all pairs differ
    flat = x.reshape(256, -1)
    dist = torch.cdist(flat, flat) + torch.eye(256) * 1e9
    assert float(dist.min()) > 1.0
    # positions vary: the pixel-wise mean image is far flatter than a single image
    assert float(x.mean(0).std()) < 0.3 * float(per_image_std.median())
    # neighbouring pixels agree (smooth shapes), unlike a pixel-shuffled copy
    def neighbour_gap(im):
        return float((im[..., 1:] - im[..., :-1]).abs().mean())
    shuffled = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))]
    assert neighbour_gap(x) < 0.25 * neighbour_gap(shuffled.reshape(x.shape))


def test_shapes_grey_has_one_channel_and_both_polarities():
    x = ShapesDataset(200, resolution=28, channels=1).render(torch.arange(200))
    background = x[:, 0, 0, 0]   # corners are mostly background
    assert (background > 0.2).any() and (background < -0.2).any()


@pytest.mark.parametrize("kwargs,word", [(dict(num_images=0), "num_images"),
                                         (dict(num_images=4, channels=2), "channels"),
                                         (dict(num_images=4, resolution=0), "resolution"),
                                         (dict(num_images=4, seed=-1), "seed")])
def test_shapes_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ShapesDataset(**kwargs)


def test_shapes_index_out_of_range():
    with pytest.raises(IndexError):
        ShapesDataset(4)[4]


# ----------------------------------------------------------------------------- image folder

def _write_folder(root):
    """A small folder of real image files, some nested, plus files that must be ignored/skipped."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "sub" / "b.JPG", quality=95)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
        root / "sub" / "deeper" / "c_grey.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)).save(
        root / "d_rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(
        root / "e_palette.gif")
    Image.fromarray(rng.integers(0, 65536, (12, 12), dtype=np.uint16)).save(root / "f_16bit.png")
    (root / "z_corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "ignored.png")
    Image.new("RGB", (8, 8)).save(root / ".dotfile.png")


def test_folder_scan_order_and_skips(tmp_path, caplog):
    _write_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agm_fast.data"):
        ds = ImageFolderDataset(tmp_path, resolution=16, channels=3)
    names = [os.path.relpath(f, tmp_path) for f in ds.files]
    assert names == ["a_rgb.png", "d_rgba.png", "e_palette.gif", "f_16bit.png",
                     os.path.join("sub", "b.JPG"), os.path.join("sub", "deeper", "c_grey.png")]
    assert ds.skipped == [str(tmp_path / "z_corrupt.png")]
    warning = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warning) == 1 and "1 unreadable" in warning[0] and "z_corrupt.png" in warning[0]
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    grey = ds[len(ds) - 1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_folder_28x28_grey_exact(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    ds = ImageFolderDataset(tmp_path, resolution=28, channels=1)
    x = ds[0]
    assert x.shape == (1, 28, 28)
    expected = torch.from_numpy(pixels).float() / 127.5 - 1
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)


def test_folder_16bit_grey_is_scaled_not_clipped(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 65536, (12, 12), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    x = ImageFolderDataset(tmp_path, resolution=12, channels=1)[0]
    expected = torch.from_numpy(pixels / 257.0).round().float() / 127.5 - 1
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)


def test_folder_center_crop_and_resize(tmp_path):
    # 60×20: black side bands, a white centre square → the crop keeps only the white part
    a = np.zeros((20, 60, 3), dtype=np.uint8)
    a[:, 20:40] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = ImageFolderDataset(tmp_path, resolution=8, channels=3)[0]
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.ones(3, 8, 8))
    g = ImageFolderDataset(tmp_path, resolution=8, channels=1)[0]
    assert g.shape == (1, 8, 8)


def test_folder_load_time_failure_substitutes_next(tmp_path, caplog):
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds.skipped == []
    (tmp_path / "1.png").write_bytes(b"\x89PNG broken after the scan")
    with caplog.at_level(logging.WARNING, logger="agm_fast.data"):
        x = ds[1]
    torch.testing.assert_close(x, ds[2])
    assert ds.load_failures == [str(tmp_path / "1.png")]
    assert any("1.png" in r.getMessage() for r in caplog.records)
    # the last index wraps around to the first
    (tmp_path / "3.png").write_bytes(b"junk")
    torch.testing.assert_close(ds[3], ds[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_counts_load_time_failures(tmp_path, workers):
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    (tmp_path / "2.png").write_bytes(b"broken later")
    loader = BatchLoader(ds, batch_size=6, global_batch=6, seed=0, workers=workers)
    assert loader.skipped_count == 1
    batches = take(loader, 2)   # two full epochs: every index, including the broken one
    assert loader.skipped_count == 2
    for _, _, images in batches:
        assert images.shape == (6, 3, 8, 8)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataset(tmp_path / "file.png", resolution=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files.*empty"):
        ImageFolderDataset(empty, resolution=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable images.*x.jpg"):
        ImageFolderDataset(broken, resolution=8)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, resolution=8, channels=4)


def test_make_dataset(tmp_path):
    _write_folder(tmp_path)
    shapes = make_dataset("shapes", resolution=16, channels=1, num_images=10, seed=3)
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 10 and shapes.seed == 3
    folder = make_dataset("folder", path=tmp_path, resolution=16, channels=3, num_images=2, seed=0)
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 2
    assert len(make_dataset("folder", path=str(tmp_path), resolution=16, channels=3)) == 6
    with pytest.raises(ValueError, match="path is required"):
        make_dataset("folder", resolution=16, channels=3)
    with pytest.raises(ValueError, match="data.dataset=.* is not allowed"):
        make_dataset("cifar", resolution=16, channels=3, num_images=4)
    with pytest.raises(ValueError, match="num_images"):
        make_dataset("shapes", resolution=16, channels=3)


# ----------------------------------------------------------------------------- order

def test_sample_order_is_a_permutation_per_epoch():
    n = 37
    order = sample_order(torch.arange(3 * n), n, seed=5).reshape(3, n)
    for epoch in range(3):
        assert torch.equal(order[epoch].sort().values, torch.arange(n))
    assert not torch.equal(order[0], order[1]) and not torch.equal(order[1], order[2])
    assert not torch.equal(order[0], torch.arange(n))
    other_seed = sample_order(torch.arange(n), n, seed=6)
    assert not torch.equal(order[0], other_seed)


def test_sample_order_is_elementwise():
    # any subset of global indices, in any order, maps like the full list (cache included)
    n = 23
    full = sample_order(torch.arange(200), n, seed=1)
    pick = torch.tensor([150, 3, 199, 46, 22, 23, 0])
    data.epoch_permutation.cache_clear()
    assert torch.equal(sample_order(pick, n, seed=1), full[pick])
    assert torch.equal(sample_order(pick.reshape(7, 1), n, seed=1), full[pick].reshape(7, 1))


def test_sample_order_errors():
    with pytest.raises(ValueError, match="non-negative"):
        sample_order(torch.tensor([-1]), 10, seed=0)
    with pytest.raises(ValueError, match="dataset_len"):
        sample_order(torch.tensor([0]), 0, seed=0)


# ----------------------------------------------------------------------------- loader

def test_loader_steps_and_indices():
    ds = ShapesDataset(50, resolution=8)
    batches = take(BatchLoader(ds, batch_size=4, global_batch=12, rank_offset=8, seed=0,
                               start_step=3), 3)
    assert [s for s, _, _ in batches] == [3, 4, 5]
    assert torch.equal(batches[0][1], torch.arange(44, 48))
    assert torch.equal(batches[2][1], torch.arange(68, 72))
    step, gidx, images = batches[1]
    expected = ds.render(sample_order(gidx, len(ds), seed=0))
    assert torch.equal(images, expected)


def test_loader_ranks_match_one_big_batch():
    ds = ShapesDataset(30, resolution=8, channels=1)   # global batch 16 crosses epoch boundaries
    whole = take(BatchLoader(ds, batch_size=16, global_batch=16, seed=2, hflip=True), 4)
    ranks = [take(BatchLoader(ds, batch_size=4, global_batch=16, rank_offset=4 * r, seed=2,
                              hflip=True), 4) for r in range(4)]
    for step in range(4):
        gidx = torch.cat([ranks[r][step][1] for r in range(4)])
        images = torch.cat([ranks[r][step][2] for r in range(4)])
        assert torch.equal(gidx, whole[step][1])
        assert torch.equal(images, whole[step][2])
        # micro-batches of one rank's chunk are slices of the same thing
        assert torch.equal(images[2:6], whole[step][2][2:6])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_is_exact(workers):
    ds = ShapesDataset(40, resolution=8)
    kwargs = dict(batch_size=6, global_batch=12, rank_offset=6, seed=4, hflip=True,
                  workers=workers)
    from_zero = take(BatchLoader(ds, **kwargs), 9)
    resumed = take(BatchLoader(ds, start_step=5, **kwargs), 4)
    for (s0, g0, x0), (s1, g1, x1) in zip(from_zero[5:], resumed):
        assert s0 == s1 and torch.equal(g0, g1) and torch.equal(x0, x1)


def test_hflip_is_deterministic_and_keyed_by_global_index():
    ds = ShapesDataset(64, resolution=8)
    plain = take(BatchLoader(ds, batch_size=64, global_batch=64, seed=9), 2)
    flipped = take(BatchLoader(ds, batch_size=64, global_batch=64, seed=9, hflip=True), 2)
    again = take(BatchLoader(ds, batch_size=64, global_batch=64, seed=9, hflip=True), 2)
    for (_, g, x), (_, g2, xf), (_, _, xf2) in zip(plain, flipped, again):
        assert torch.equal(xf, xf2) and torch.equal(g, g2)
        mask = data.flip_mask(g, seed=9)
        assert 10 < int(mask.sum()) < 54
        assert torch.equal(xf[mask], x[mask].flip(-1))
        assert torch.equal(xf[~mask], x[~mask])
    # the decision is the DATA-stream uniform of the global index, independent of the batch
    assert torch.equal(data.flip_mask(torch.tensor([70]), 9), data.flip_mask(plain[1][1], 9)[6:7])
    g = torch.arange(64)
    assert not torch.equal(data.flip_mask(g, 9), data.flip_mask(g, 10))


def test_loader_accepts_plain_datasets():
    tensors = torch.randn(10, 1, 4, 4)
    ds = torch.utils.data.TensorDataset(tensors, torch.zeros(10))
    (_, gidx, images), = take(BatchLoader(ds, batch_size=10, global_batch=10, seed=0), 1)
    assert torch.equal(images, tensors[sample_order(gidx, 10, 0)])


def test_loader_argument_errors():
    ds = ShapesDataset(8, resolution=8)
    with pytest.raises(ValueError, match="rank_offset \\+ batch_size"):
        BatchLoader(ds, batch_size=4, global_batch=8, rank_offset=6, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, batch_size=0, global_batch=8, seed=0)
    BatchLoader(ds, batch_size=4, global_batch=4, seed=0)   # data.loader's choice: tests/test_loaders.py
