"""Feature-space metrics (agm_fast.fid) and feature extractors (agm_fast.features)."""

import itertools
import os

import numpy as np
import pytest
import torch

from agm_fast import features as fe
from agm_fast import fid
from tests.conftest import skip_unless_available


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)

#----------------------------------------------------------------------------
# Fréchet distance.

def test_frechet_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    for n, d in [(500, 16), (10, 32)]:  # full-rank and singular (N < D) covariances
        x = rng.standard_normal((n, d)) * 3 + 1
        assert fid.frechet_distance_of_features(x, x) == pytest.approx(0, abs=1e-9 * d)


def test_frechet_diagonal_gaussians_closed_form():
    # Commuting covariances: d² = |μ₁ − μ₂|² + Σᵢ (√aᵢ − √bᵢ)², also after a common rotation Q.
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    # 1-D: (μ₁ − μ₂)² + (σ₁ − σ₂)²
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-14)


def test_frechet_non_commuting_2x2_closed_form():
    # For 2×2 A with eigenvalues λ₁, λ₂ ≥ 0: Tr √A = √λ₁ + √λ₂ = √(Tr A + 2 √det A).
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_scipy_sqrtm_and_samples():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    d = 8
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Feature sets drawn from those Gaussians: the statistics are np.mean / np.cov, and the
    # distance approaches the population value.
    x = rng.multivariate_normal(mu1, s1, size=20000)
    y = rng.multivariate_normal(mu2, s2, size=20000)
    mu, sigma = fid.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert fid.frechet_distance_of_features(x, y) == pytest.approx(expected, rel=0.05)


def test_frechet_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fid.feature_statistics(np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        fid.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))

#----------------------------------------------------------------------------
# KID.

def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    assert fid.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_identical_near_zero_shifted_positive():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 32))
    y = rng.standard_normal((1000, 32))
    # Subsets of one finite set drawn independently can share points, so KID(x, x) is ≈ 0 only
    # up to O((k(x,x) − k(x,x'))/N) ≈ 1e-2 here; another draw of the same law is ≈ 0 unbiasedly.
    same_mean, same_std = fid.kid(x, x, subsets=8, subset_size=500)
    fresh_mean, _ = fid.kid(x, y, subsets=8, subset_size=500)
    shifted_mean, shifted_std = fid.kid(x, y + 0.5, subsets=8, subset_size=500)
    assert abs(same_mean) < 0.03 * shifted_mean and abs(fresh_mean) < 0.03 * shifted_mean
    assert shifted_mean > 10 * shifted_std > 0
    assert same_std >= 0
    # subset size is min(1000, N): a small set still works and is deterministic for a seed
    assert fid.kid(x[:50], y[:60]) == fid.kid(x[:50], y[:60])
    with pytest.raises(ValueError, match="different dimensions"):
        fid.kid(x, y[:, :5])
    with pytest.raises(ValueError, match="at least 2"):
        fid.kid(x[:1], y)

#----------------------------------------------------------------------------
# PRDC.

def _prdc_by_definition(real, fake, k):
    def radii(z):
        d = np.linalg.norm(z[:, None] - z[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    r, s = radii(real), radii(fake)
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # [N, M]
    return {"precision": np.mean([any(d[i, j] < r[i] for i in range(len(real))) for j in range(len(fake))]),
            "recall": np.mean([any(d[i, j] < s[j] for j in range(len(fake))) for i in range(len(real))]),
            "density": np.sum(d < r[:, None]) / (k * len(fake)),
            "coverage": np.mean([any(d[i, j] < r[i] for j in range(len(fake))) for i in range(len(real))])}


def test_prdc_identical_and_disjoint():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8))
    same = fid.prdc(x, x)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0, abs=0.02)  # each ball holds itself + k−1 others
    apart = fid.prdc(x, rng.standard_normal((200, 8)) + 100.0)
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_matches_the_definition_in_chunks():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((40, 3)), rng.standard_normal((33, 3)) * 0.8 + 0.6
    expected = _prdc_by_definition(real, fake, 5)
    for chunk in (7, 1024):
        got = fid.prdc(real, fake, chunk=chunk)
        assert got == pytest.approx(expected, abs=1e-12)
    assert all(0 < v < 1 for v in expected.values())  # no metric trivially 0 or 1 here


def test_prdc_by_hand_with_ties():
    # 1-D, k = 1. Reals 0, 2, 4, 6, 24, 25: radii 2, 2, 2, 2, 1, 1. Fakes 1, 4, 8, 20, 22: radii
    # 3, 3, 4, 2, 2. Balls are open, so points on a boundary are outside: fake 8 (real 6's ball),
    # real 24 (fake 22's ball), fake 4 (the balls of reals 2 and 6).
    real = np.array([0.0, 2, 4, 6, 24, 25])[:, None]
    fake = np.array([1.0, 4, 8, 20, 22])[:, None]
    got = fid.prdc(real, fake, k=1)
    assert got == pytest.approx({"precision": 2 / 5,   # fakes 1 and 4 lie in some real ball
                                 "recall": 4 / 6,      # reals 0, 2, 4, 6 are within 3 of fake 1 or 4
                                 "density": 3 / 5,     # fake 1 in the balls of 0 and 2, fake 4 in that of 4
                                 "coverage": 3 / 6},   # the balls of reals 0, 2, 4 hold a fake
                                abs=1e-15)


def test_prdc_too_few_samples_is_a_clear_error():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="k = 5 .* at least 6"):
        fid.prdc(x, np.ones((10, 3)))
    with pytest.raises(ValueError, match="different dimensions"):
        fid.prdc(np.ones((10, 3)), np.ones((10, 4)))

#----------------------------------------------------------------------------
# Dataset feature cache.

def test_dataset_features_cache(tmp_path):
    rng = np.random.default_rng(7)
    feats = rng.standard_normal((50, 4)).astype(np.float32).astype(np.float64)
    calls = []

    def compute():
        calls.append(1)
        return feats

    key = dict(dataset_checksum="abc123", backbone="efflite0", resolution=32)
    first = fid.dataset_features(tmp_path, compute=compute, weights_id="w1", **key)
    second = fid.dataset_features(tmp_path, compute=compute, weights_id="w1", **key)
    assert len(calls) == 1
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(second.features, feats)
    np.testing.assert_allclose(second.sigma, np.cov(feats, rowvar=False), rtol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features-efflite0-32px-abc123.npz"]
    fid.dataset_features(tmp_path, compute=compute, weights_id="w2", **key)   # other weights: recompute
    assert len(calls) == 2
    fid.dataset_features(tmp_path, compute=compute, weights_id="w2", **{**key, "resolution": 64})
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 2  # no temporary files left
    with pytest.raises(ValueError, match="dataset_checksum"):
        fid.stats_cache_path(tmp_path, "../x", "efflite0", 32)

#----------------------------------------------------------------------------
# Feature extractors.

def _images(n, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def test_fid_needs_the_weights_file_and_the_fallback_is_never_fid():
    with pytest.raises(ValueError, match="--inception-weights"):
        fe.extract(_images(2), "inception")
    with pytest.raises(ValueError, match="--inception-weights"):
        fe.load_inception(None)
    assert fe.metric_label("inception") == "FID"
    fallback = fe.default_backbone(None)
    assert fallback == "efflite0" and fe.metric_label(fallback) == "FD-EffLite0"
    assert all("FID" not in label for backbone, label in fe.BACKBONES.items() if backbone != "inception")
    assert fe.default_backbone("weights.pth") == "inception"
    with pytest.raises(ValueError, match="unknown feature backbone"):
        fe.metric_label("vgg")


def test_inception_loads_the_standard_layout_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    state = fe.FIDInceptionV3().state_dict()
    # the key layout of the standard FID weights file (pt_inception-2015-12-05)
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
              "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
              "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
              "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
              "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
              "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
              "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
              "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # a randomly initialised state dict saved as a file (without num_batches_tracked, like old files)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-random.pth"
    torch.save(state, path)
    feats = fe.extract(_images(1, c=1, size=28), "inception", batch_size=1, inception_weights=path)
    assert feats.shape == (1, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # the same tensors as safetensors load to the same network
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = fe.load_inception(tmp_path / "w.safetensors").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # a file of another layout is refused with the file and the keys named
    bad = dict(state)
    bad["Mixed_5b.extra.weight"] = bad.pop("Mixed_5b.branch1x1.conv.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth is not an FID Inception.*Mixed_5b"):
        fe.load_inception(tmp_path / "bad.pth")


def test_extract_rejects_bad_images():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fe.extract(torch.zeros(3, 32, 32), "efflite0")
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        fe.extract(torch.zeros(2, 4, 32, 32), "efflite0")
    with pytest.raises(ValueError, match="floating point"):
        fe.extract(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "efflite0")


def _require_efflite():
    ok, why = fe.efflite0_available()
    skip_unless_available("efflite", ok, why)


def test_efflite0_packaged_weights_deterministic_and_batch_invariant():
    _require_efflite()
    x = _images(3)
    a = fe.extract(x, "efflite0", batch_size=2)
    assert a.shape == (3, fe.FEATURE_DIMS["efflite0"]) and a.dtype == np.float64 and np.isfinite(a).all()
    assert a.std() > 0.01  # the real weights, not a constant
    np.testing.assert_array_equal(fe.extract(x, "efflite0", batch_size=2), a)        # same again, fp32
    # for a given batch_size an image's features do not depend on N or on its neighbours...
    np.testing.assert_array_equal(fe.extract(x[2:], "efflite0", batch_size=2), a[2:])
    np.testing.assert_array_equal(fe.extract(x.flip(0), "efflite0", batch_size=2), a[::-1])
    # ...and across batch sizes they agree to fp32 rounding
    for batch_size in (1, 3):
        np.testing.assert_allclose(fe.extract(x, "efflite0", batch_size=batch_size), a, rtol=1e-5, atol=1e-5)
    grey = x[:1, :1]
    np.testing.assert_array_equal(fe.extract(grey, "efflite0", batch_size=1),
                                  fe.extract(grey.expand(-1, 3, -1, -1), "efflite0", batch_size=1))


def test_efflite0_classifies_a_photo():
    # The architecture and the input normalisation are right if the packaged ImageNet weights
    # recognise a photo: matplotlib's sample portrait of Grace Hopper in navy uniform.
    _require_efflite()
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image
    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(photo):
        pytest.skip("matplotlib sample photo not installed")
    img = np.array(Image.open(photo).convert("RGB"))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        top5 = fe.load_backbone("efflite0").logits(x).topk(5).indices[0].tolist()
    assert top5[0] == 652  # ImageNet "military uniform"
