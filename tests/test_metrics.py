"""Sliced Wasserstein distance and pixel statistics (agm_fast/metrics.py)."""

import numpy as np
import pytest
import torch

from agm_fast.data import ShapesDataset
from agm_fast.metrics import pixel_stats, sliced_wasserstein


@pytest.fixture(scope="module")
def shapes():
    # Two disjoint sets from the same distribution. Not fewer: light and dark backgrounds are two
    # modes, and W2 grows like sqrt(mass moved between them), so small sets differ by chance.
    ds = ShapesDataset(2000, resolution=16, channels=3, seed=0)
    x = ds.render(torch.arange(2000))
    return x[:1000], x[1000:]


def test_zero_for_identical_sets_and_symmetric(shapes):
    a, b = shapes
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(1000)]) == 0.0   # a set, not a sequence
    ab, ba = sliced_wasserstein(a, b), sliced_wasserstein(b, a)
    assert ab > 0 and abs(ab - ba) <= 1e-12 * ab


def test_deterministic_and_seeded(shapes):
    a, b = shapes
    assert sliced_wasserstein(a, b, seed=3) == sliced_wasserstein(a, b, seed=3)
    assert sliced_wasserstein(a, b, seed=3) != sliced_wasserstein(a, b, seed=4)


def test_grows_with_a_mean_shift(shapes):
    a, _ = shapes
    d = [sliced_wasserstein(a, a + delta) for delta in (0.05, 0.1, 0.2, 0.4)]
    assert d[0] < d[1] < d[2] < d[3]
    # a shift of δ in every coordinate moves every unit projection by δ·(1·θ), E(1·θ)² = 1
    for delta, value in zip((0.05, 0.1, 0.2, 0.4), d):
        assert value == pytest.approx(delta, rel=0.25)


def test_measures_structure(shapes):
    a, b = shapes
    held_out = sliced_wasserstein(a, b)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert sliced_wasserstein(a, noise) > 4 * held_out
    # pixel-shuffled shapes keep every colour value but lose all structure
    gen = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(256, generator=gen) for _ in range(1000)])
    shuffled = b.reshape(1000, 3, 256).gather(2, perm[:, None].expand(-1, 3, -1)).reshape(b.shape)
    for downsample in (None, 4):
        assert (sliced_wasserstein(a, shuffled, downsample=downsample)
                > 2 * sliced_wasserstein(a, b, downsample=downsample))


def test_unequal_sizes_compare_quantiles(shapes):
    a, b = shapes
    held_out = sliced_wasserstein(a, b)
    assert sliced_wasserstein(a, b[:750]) == pytest.approx(held_out, rel=0.3)
    assert sliced_wasserstein(a, torch.cat([a, a])) < 0.3 * held_out
    assert sliced_wasserstein(a[:1], a[:1] + 0.5) == pytest.approx(0.5, rel=0.25)


def test_flat_grey_and_downsample_inputs(shapes):
    a, b = shapes
    grey_a, grey_b = a[:, :1], b[:, :1]
    assert sliced_wasserstein(grey_a, grey_b, downsample=8) > 0
    assert sliced_wasserstein(a.reshape(1000, -1), b.reshape(1000, -1)) == sliced_wasserstein(a, b)
    # pooling to the full size is the identity
    assert sliced_wasserstein(a, b, downsample=16) == sliced_wasserstein(a, b)
    assert sliced_wasserstein(a.double(), b.double()) == pytest.approx(sliced_wasserstein(a, b))


def test_bad_arguments(shapes):
    a, b = shapes
    with pytest.raises(ValueError, match="same sample shape"):
        sliced_wasserstein(a, b[:, :1])
    with pytest.raises(ValueError, match="projections"):
        sliced_wasserstein(a, b, projections=0)
    with pytest.raises(ValueError, match="downsample"):
        sliced_wasserstein(a.reshape(1000, -1), b.reshape(1000, -1), downsample=4)
    with pytest.raises(ValueError, match="downsample"):
        sliced_wasserstein(a, b, downsample=32)
    with pytest.raises(ValueError, match="a must be a tensor"):
        sliced_wasserstein(a[:0], b)


def test_pixel_stats():
    x = torch.randn(5, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    stats = pixel_stats(x)
    arr = x.numpy().astype(np.float64)
    np.testing.assert_allclose(stats["mean"], arr.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], arr.std(axis=(0, 2, 3)), rtol=1e-12)
    with pytest.raises(ValueError, match="images"):
        pixel_stats(x[0])
