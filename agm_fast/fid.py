"""Distances between two sets of image features: Fréchet distance (FID / FD-EffLite0), KID and
precision / recall / density / coverage, plus the on-disk cache of a dataset's features.

This module owns the statistics, not the networks: features come from features.extract (the
backbone decides the label: "FID" only on Inception features, "FD-EffLite0" otherwise). All
arithmetic is float64 numpy; nothing here needs scipy or a GPU.

  frechet_distance   d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the W₂² distance of two Gaussians
                     (Dowson & Landau 1982) fitted to the features (FID: Heusel et al. 2017, TTUR)
  kid                unbiased MMD² (Gretton et al. 2012) with k(x, y) = (xᵀy / d + 1)³, mean ± std
                     over random subsets (KID: Bińkowski et al. 2018, "Demystifying MMD GANs")
  prdc               k-NN manifold precision and recall (Kynkäänniemi et al. 2019) with density
                     and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
                     for Generative Models"), k = 5 as there
  dataset_features   features of a prepared dataset, cached on disk under a name keyed by the
                     dataset checksum, the backbone and the resolution; written atomically
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .files import atomic_write

PRDC_K = 5                  # nearest neighbour defining each sample's ball (Naeem et al. use k = 5)
KID_SUBSET_SIZE = 1000      # per-subset sample count (clamped to the smaller set)
KID_SUBSETS = 100
CACHE_FORMAT = 1            # bump when the cached content changes meaning


def _check_features(x, name: str, min_rows: int = 1, why: str = "") -> np.ndarray:
    """float64 [N, D] copy-free view of a feature set, with N >= min_rows and finite values."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be features [N, D], got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} samples; {why or f'at least {min_rows} needed'}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def _check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets have different dimensions: {a.shape[1]} vs {b.shape[1]}")

#----------------------------------------------------------------------------
# Fréchet distance.

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ [D] and unbiased covariance Σ [D, D] (divisor N − 1, as np.cov) in float64."""
    x = _check_features(features, "features", 2, "a covariance needs N >= 2")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; eigenvalues below 0 (rounding) become 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ₁Σ₂)^½) for symmetric PSD Σ₁, Σ₂.

    Σ₁Σ₂ is similar to the symmetric PSD M = Σ₁^½ Σ₂ Σ₁^½ (conjugate by Σ₁^½ where Σ₁ is
    invertible, and by continuity otherwise), so both have the same non-negative eigenvalues and
    Tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(M). Working with M replaces sqrtm of a non-symmetric product: no
    complex round-off to discard, and singular covariances (N ≤ D) need no ε·I offset.
    """
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (Wasserstein-2²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64:
    d² = |μ₁ − μ₂|² + Tr Σ₁ + Tr Σ₂ − 2 Tr((Σ₁Σ₂)^½)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; "
                         f"sigma {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # d² >= 0; cancellation in the trace can leave a rounding residue of either sign.
    return max(float(value), 0.0)


def frechet_distance_of_features(a, b) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [Na, D] and b [Nb, D]."""
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(a), feature_statistics(b)
    return frechet_distance(mu1, sigma1, mu2, sigma2)

#----------------------------------------------------------------------------
# Kernel Inception Distance.

def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / d + 1)³, the KID kernel."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two samples of equal size m (the U-statistic of Gretton et al. 2012):
    Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(m(m−1)) − 2 Σ_{i,j} k(xᵢ,yⱼ)/m²."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(a, b, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std) over `subsets` random subsets of
    min(subset_size, Na, Nb) samples drawn without replacement from each set (seeded)."""
    a = _check_features(a, "a", 2, "KID needs at least 2 samples per set")
    b = _check_features(b, "b", 2, "KID needs at least 2 samples per set")
    _check_same_dim(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)],
                                     b[rng.choice(b.shape[0], m, replace=False)])
                       for _ in range(subsets)])
    return float(values.mean()), float(values.std())

#----------------------------------------------------------------------------
# Precision, recall, density, coverage.

def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances [Nx, Ny] via |x|² + |y|² − 2xᵀy (clipped at 0 against cancellation)."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.clip(d2, 0, None))


def _kth_neighbour_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (the row itself, at distance 0,
    is neighbour 0)."""
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        d = _pairwise_distances(x[start:start + chunk], x)
        radii[start:start + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(real, fake, *, k: int = PRDC_K, chunk: int = 1024) -> dict:
    """Precision, recall, density and coverage of `fake` w.r.t. `real` (Naeem et al. 2020).

    B(x, r) is the open ball; rᵢ = distance from real i to its k-th nearest real neighbour,
    sⱼ likewise within the fakes.
      precision = 1/M Σⱼ 1[∃i: fⱼ ∈ B(xᵢ, rᵢ)]      (fidelity: fakes on the real manifold)
      recall    = 1/N Σᵢ 1[∃j: xᵢ ∈ B(fⱼ, sⱼ)]      (diversity: reals on the fake manifold)
      density   = 1/(kM) Σⱼ Σᵢ 1[fⱼ ∈ B(xᵢ, rᵢ)]    (how many real balls hold each fake; ≈ 1 when P = Q)
      coverage  = 1/N Σᵢ 1[∃j: fⱼ ∈ B(xᵢ, rᵢ)]      (real balls that hold at least one fake)
    Distance matrices are built `chunk` rows at a time (memory O(chunk · max(N, M))).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    why = f"k = {k} nearest neighbours need at least {k + 1} samples"
    real = _check_features(real, "real", k + 1, why)
    fake = _check_features(fake, "fake", k + 1, why)
    _check_same_dim(real, fake)
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)

    fake_in_real_balls = np.zeros(fake.shape[0], dtype=np.int64)  # per fake: number of real balls containing it
    real_in_fake_ball = np.zeros(real.shape[0], dtype=bool)        # per real: inside some fake ball
    real_ball_has_fake = np.zeros(real.shape[0], dtype=bool)       # per real: its ball contains some fake
    for start in range(0, real.shape[0], chunk):
        rows = slice(start, start + chunk)
        d = _pairwise_distances(real[rows], fake)                  # [chunk, M]
        inside_real_ball = d < real_radii[rows, None]
        fake_in_real_balls += inside_real_ball.sum(axis=0)
        real_ball_has_fake[rows] = inside_real_ball.any(axis=1)
        real_in_fake_ball[rows] = (d < fake_radii[None, :]).any(axis=1)
    return {
        "precision": float((fake_in_real_balls > 0).mean()),
        "recall": float(real_in_fake_ball.mean()),
        "density": float(fake_in_real_balls.mean() / k),
        "coverage": float(real_ball_has_fake.mean()),
    }

#----------------------------------------------------------------------------
# Dataset feature cache.

class DatasetFeatures(NamedTuple):
    features: np.ndarray  # [N, D] float64 (the network's fp32 values, stored exactly as float32)
    mu: np.ndarray        # [D]
    sigma: np.ndarray     # [D, D]


def stats_cache_path(cache_dir, dataset_checksum: str, backbone: str, resolution: int) -> Path:
    """File of the cached features of one (dataset checksum, backbone, resolution)."""
    for name, value in (("dataset_checksum", dataset_checksum), ("backbone", backbone)):
        if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"{name} must be a non-empty string of letters, digits, '-' and '_', got {value!r}")
    return Path(cache_dir) / f"features-{backbone}-{int(resolution)}px-{dataset_checksum}.npz"


def dataset_features(cache_dir, *, dataset_checksum: str, backbone: str, resolution: int,
                     compute: Callable[[], np.ndarray], weights_id: str = "") -> DatasetFeatures:
    """Features and their statistics for a dataset, from the cache or from compute() (then cached).

    The file name is keyed by (dataset_checksum, backbone, resolution); `weights_id` (e.g. a
    digest of the Inception weights file) and the cache format are stored inside and checked,
    so a different weights file recomputes and overwrites rather than reusing stale features.
    """
    path = stats_cache_path(cache_dir, dataset_checksum, backbone, resolution)
    meta = {"format": CACHE_FORMAT, "dataset_checksum": dataset_checksum, "backbone": backbone,
            "resolution": int(resolution), "weights_id": weights_id}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["meta"])) == meta:
                    feats = f["features"].astype(np.float64)
                    return DatasetFeatures(feats, f["mu"], f["sigma"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign file: recompute and replace it
    feats = _check_features(compute(), "computed dataset features", 2, "a covariance needs N >= 2")
    feats = feats.astype(np.float32).astype(np.float64)  # what the cache holds, so both paths agree
    mu, sigma = feature_statistics(feats)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, features=feats.astype(np.float32), mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))

    atomic_write(path, write)
    return DatasetFeatures(feats, mu, sigma)
