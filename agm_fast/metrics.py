"""Cheap, download-free sample-quality numbers (not FID: see docs/design.md §6 for FID / FD-EffLite0).

`sliced_wasserstein` compares two image sets as point clouds in pixel space: it projects both
on fixed random unit directions and averages the 1-D Wasserstein-2 distances (sorted
projections). It needs no network and no weights, so it runs in tests and on every eval of a
CPU demo; it is sensitive to colour statistics and, through the joint distribution of pixels
(or of average-pooled blocks with `downsample`), to structure. Scale: if one set is the other
shifted by δ in every coordinate, the distance is about |δ|, whatever the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_set(x, name: str, downsample: int | None) -> int:
    """Validate one image set; return the dimension of a (pooled, flattened) sample."""
    if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] < 1:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [N, ...] with N >= 1 samples, got {got}")
    if downsample is None:
        return x[0].numel()
    if x.dim() != 4:
        raise ValueError(f"downsample needs images [N, C, H, W]; {name} is {tuple(x.shape)}")
    if downsample > min(x.shape[-2:]):
        raise ValueError(f"downsample ({downsample}) must not exceed the image size "
                         f"{tuple(x.shape[-2:])} of {name}")
    return x.shape[1] * downsample * downsample


def _project(x: torch.Tensor, theta: torch.Tensor, downsample: int | None,
             chunk: int = 1024) -> torch.Tensor:
    """Sorted projections [N, P] in float64; rows go through in chunks to bound memory."""
    out = []
    for part in x.detach().split(chunk):
        part = part.to(device=theta.device, dtype=torch.float64)
        if downsample is not None and part.shape[-2:] != (downsample, downsample):
            part = F.adaptive_avg_pool2d(part, downsample)
        out.append(part.reshape(part.shape[0], -1) @ theta)
    return torch.cat(out).sort(dim=0).values


def _quantiles(sorted_proj: torch.Tensor, m: int) -> torch.Tensor:
    """Values at quantile levels (i + 0.5)/m of each column (linear interpolation); [m, P]."""
    n = sorted_proj.shape[0]
    if n == m:
        return sorted_proj
    pos = ((torch.arange(m, dtype=torch.float64, device=sorted_proj.device) + 0.5) * n / m - 0.5)
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, projections: int = 256, seed: int = 0,
                       downsample: int | None = None) -> float:
    """Sliced Wasserstein-2 distance between image sets a [Na, ...] and b [Nb, ...].

    sqrt( mean over P random unit directions θ of W2²(θ·a, θ·b) ), in float64. The directions
    come from a torch.Generator seeded with `seed`, so the number is deterministic. Equal-size
    sets compare sorted projections; otherwise both are read at max(Na, Nb) quantile levels.
    `downsample=k` first average-pools images [N, C, H, W] to k×k (focus on coarse structure).
    """
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise ValueError(f"projections must be a positive integer, got {projections!r}")
    if downsample is not None and (isinstance(downsample, bool) or not isinstance(downsample, int)
                                   or downsample < 1):
        raise ValueError(f"downsample must be None or a positive integer, got {downsample!r}")
    dim = _check_set(a, "a", downsample)
    _check_set(b, "b", downsample)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must have the same sample shape, got {tuple(a.shape[1:])} "
                         f"and {tuple(b.shape[1:])}")
    # directions drawn on the CPU: the same numbers whatever device the images are on
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    pa, pb = _project(a, theta, downsample), _project(b, theta, downsample)
    m = max(pa.shape[0], pb.shape[0])
    sq = (_quantiles(pa, m) - _quantiles(pb, m)).pow(2).mean()
    return float(sq.sqrt())


def pixel_stats(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std of images [N, C, H, W] (float64), e.g. samples vs data."""
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    x = images.detach().to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)
    return {"mean": x.mean(dim=1).tolist(), "std": x.std(dim=1, correction=0).tolist()}
