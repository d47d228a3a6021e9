"""Reference math of AGM (docs/design.md §1): pure PyTorch, fp32 unless the inputs are fp64.

Owns the bridge (sampling x_t, the drift target, the drift implied by a prediction), the
potential's negatives and hinge loss, the importance weights and the weighted drift loss with
its LossOutput. Every fast path (agm_fast.kernels, agm_fast._C) is tested against these
functions. Time runs t ∈ [0, 1]: x0 ~ N(0, I) at t = 0, data x1 ∈ [-1, 1] at t = 1.
Hyperparameters (σ, predicts, scheme, favour, τ, clip, patch) have no defaults here: the
config is the one place with defaults (normalise=batch, t_bins=1 here only mean "no t-bins",
so that callers of the batch scheme need not name them). Choice arguments are checked at the public functions
(agm_fast.checks); tensors are trusted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import checks, rng

def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample t [B] → [B, 1, 1, ...] to broadcast over a sample's elements."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- noise and time

def sample_t(seed: int, step: int, sample_index, t_min: float, t_eps: float,
             device="cpu") -> torch.Tensor:
    """t ~ U[t_min, 1 - t_eps] per sample (fp32), from the T stream: u ∈ (0, 1] → t ≤ 1 - t_eps."""
    u = rng.uniform(seed, step, sample_index, rng.Stream.T, device)[:, 0]
    return t_min + (1.0 - t_eps - t_min) * u


def draw_bridge_noise(seed: int, step: int, sample_index, shape, device="cpu"):
    """x0 and ε for a batch of `shape`, keyed per global sample (streams X0 and EPS)."""
    x0 = rng.normal_like(tuple(shape), seed, step, sample_index, rng.Stream.X0, device)
    eps = rng.normal_like(tuple(shape), seed, step, sample_index, rng.Stream.EPS, device)
    return x0, eps


# ----------------------------------------------------------------------------- the bridge

def bridge_sample(x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                  sigma: float) -> torch.Tensor:
    """x_t = (1-t)·x0 + t·x1 + σ·sqrt(t(1-t))·ε  (Brownian bridge from x0 to x1)."""
    tb = _bcast(t, x1)
    return (1 - tb) * x0 + tb * x1 + sigma * torch.sqrt(tb * (1 - tb)) * eps


def drift_target(x1: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                 sigma: float) -> torch.Tensor:
    """u_t = (x1 - x_t)/(1 - t), written without the division: x1 - x0 - σ·sqrt(t/(1-t))·ε."""
    tb = _bcast(t, x1)
    return x1 - x0 - sigma * torch.sqrt(tb / (1 - tb)) * eps


def drift_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                          predicts: str) -> torch.Tensor:
    """The drift implied by the network output: itself, or (x̂1 - x_t)/(1 - t) for predicts=x1."""
    if checks.one_of("predicts", predicts, checks.PREDICTS) == "drift":
        return pred
    return (pred - x_t) / (1 - _bcast(t, x_t))


# ----------------------------------------------------------------------------- the potential

def negatives(x1: torch.Tensor, kind: str, seed: int, step: int, sample_index,
              patch: int) -> torch.Tensor:
    """Structure-destroyed copies of x1 for the degenerate bridge x_t⁻ (NEGATIVES stream).

    pixel_shuffle: one random permutation of pixel positions per image, shared by its
      channels, so each image keeps its exact colour histogram but loses all structure.
    patch_shuffle: the same on non-overlapping patch×patch tiles (a remainder strip stays).
    noise: Gaussian noise with each image's per-channel mean and std.
    """
    checks.one_of("kind of negatives", kind, checks.NEGATIVES)
    b, c, h, w = x1.shape
    if kind == "pixel_shuffle":
        u = rng.uniform(seed, step, sample_index, rng.Stream.NEGATIVES, x1.device, numel=h * w)
        perm = torch.argsort(u, dim=1)
        flat = x1.reshape(b, c, h * w)
        return torch.gather(flat, 2, perm[:, None, :].expand(b, c, h * w)).reshape(b, c, h, w)
    if kind == "patch_shuffle":
        ph, pw = h // patch, w // patch
        if ph * pw < 2:
            raise ValueError(f"patch_shuffle needs at least 2 patches of {patch}² in {h}×{w}")
        u = rng.uniform(seed, step, sample_index, rng.Stream.NEGATIVES, x1.device, numel=ph * pw)
        perm = torch.argsort(u, dim=1)
        core = x1[:, :, : ph * patch, : pw * patch]
        tiles = core.reshape(b, c, ph, patch, pw, patch).permute(0, 2, 4, 1, 3, 5)
        tiles = tiles.reshape(b, ph * pw, c, patch, patch)
        tiles = torch.gather(tiles, 1, perm[:, :, None, None, None].expand_as(tiles))
        core = tiles.reshape(b, ph, pw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
        out = x1.clone()
        out[:, :, : ph * patch, : pw * patch] = core.reshape(b, c, ph * patch, pw * patch)
        return out
    # kind == "noise"
    z = rng.normal_like(tuple(x1.shape), seed, step, sample_index, rng.Stream.NEGATIVES,
                        x1.device).to(x1.dtype)
    mean = x1.mean(dim=(2, 3), keepdim=True)
    std = x1.std(dim=(2, 3), keepdim=True, unbiased=False)
    return mean + std * z


def potential_hinge_loss(v_pos: torch.Tensor, v_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Paper Eq. 10: L_V = mean(relu(m + V(x_t⁺, t) - V(x_t⁻, t))); coherent bridges get low V."""
    return torch.relu(margin + v_pos - v_neg).mean()


def importance_weights(v: torch.Tensor, *, scheme: str, favour: str, tau: float, clip: float,
                       normalise: str = "batch", t: torch.Tensor | None = None,
                       t_bins: int = 1) -> torch.Tensor:
    """Stop-gradient importance weights from the batch's potentials (fp32, mean exactly 1).

    normalise=batch: s = clamp(standardise(sg[V]), -c, c) over the whole batch, with the
    population std (s = 0 for B = 1 or equal V).
    normalise=t_bins: the same standardisation within t-quantile bins of the batch (t: the
    batch's times, one per V): samples ranked by t (ties by batch position) and the sample of
    rank r in bin ⌊r·K/B⌋, K = t_bins; s = 0 in a bin of one sample or of equal V.
    Then w = B·softmax(∓s/τ) over the whole batch: − favours coherent (low-V) bridges, + degenerate
    ones (focal-style); w ≡ 1 when every s is 0. max/min ≤ e^(2c/τ). clip = inf turns clipping
    off. scheme=uniform gives w ≡ 1.
    """
    checks.one_of("scheme", scheme, checks.SCHEMES)
    checks.one_of("favour", favour, checks.FAVOURS)
    t = _check_t_bins(normalise, t_bins, t, v.numel(), "t")
    return _importance_weights(v, scheme, favour, tau, clip, normalise, t, t_bins)


def _check_t_bins(normalise: str, t_bins, t, n_v: int, t_name: str):
    """Checks normalise, t_bins (an int >= 1) and, for t_bins, t (one time per V)."""
    checks.one_of("normalise", normalise, checks.NORMALISE)
    if isinstance(t_bins, bool) or not isinstance(t_bins, int) or t_bins < 1:
        raise ValueError(f"t_bins must be an integer >= 1, got {t_bins!r}")
    if normalise == "batch":
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"normalise='t_bins' needs {t_name}, a floating-point tensor of the batch's times "
                        f"(one per value of V), got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if t.numel() != n_v:
        raise ValueError(f"{t_name} holds {t.numel()} times but V holds {n_v} values: pass the whole "
                         f"optimiser batch's t, in V's order")
    return t


def t_bin_ids(t: torch.Tensor, t_bins: int) -> torch.Tensor:
    """The t-quantile bin of each sample (int64 [B]): rank r by fp32 t (ties by batch position,
    so a pure function of the batch) → bin ⌊r·K/B⌋. Bin k holds ranks ceil(kB/K) … ceil((k+1)B/K) - 1."""
    t = t.detach().to(torch.float32).reshape(-1)
    b = t.numel()
    order = torch.sort(t, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(b, device=t.device)
    return rank * min(t_bins, b) // b


def _importance_weights(v: torch.Tensor, scheme: str, favour: str, tau: float, clip: float,
                        normalise: str = "batch", t: torch.Tensor | None = None,
                        t_bins: int = 1) -> torch.Tensor:
    """importance_weights for checked choices."""
    v = v.detach().to(torch.float32).reshape(-1)
    b = v.numel()
    if scheme == "uniform":
        return torch.ones_like(v)
    sign = -1.0 if favour == "coherent" else 1.0
    if normalise == "t_bins":
        bins = t_bin_ids(t.to(v.device), t_bins)
        k = min(t_bins, b)
        count = torch.bincount(bins, minlength=k).to(torch.float32)
        mean = torch.zeros(k, device=v.device).index_add_(0, bins, v) / count
        centred = v - mean[bins]
        std = (torch.zeros(k, device=v.device).index_add_(0, bins, centred.square()) / count).sqrt()[bins]
        spread = std > 0
        s = torch.where(spread, centred / torch.where(spread, std, 1.0), 0.0).clamp(-clip, clip)
        # all-equal V: w ≡ 1 exactly; decided on the device (no host sync, capturable)
        return torch.where((s != 0).any(), b * torch.softmax(sign * s / tau, dim=0), 1.0)
    if b == 1:
        return torch.ones_like(v)
    centred = v - v.mean()
    std = centred.square().mean().sqrt()
    spread = std > 0
    s = torch.where(spread, centred / torch.where(spread, std, 1.0), 0.0).clamp(-clip, clip)
    return torch.where(spread, b * torch.softmax(sign * s / tau, dim=0), 1.0)


# ----------------------------------------------------------------------------- the drift loss

class LossOutput(NamedTuple):
    loss: torch.Tensor        # scalar, differentiable w.r.t. pred
    per_sample: torch.Tensor  # [B] fp32 per-sample mean squared error (detached)
    weights: torch.Tensor     # [B] fp32 importance weights of this chunk (detached)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor,
                 normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 13 on a chunk: Σ_b w_b·mean_pixels((pred - target)²) / normalizer."""
    err = (pred.to(torch.float32) - target.to(torch.float32)).square()
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return (w * per_sample).sum() / normalizer, per_sample.detach()


def weighted_bridge_loss(pred: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                         *, seed: int, step: int, sample_index, sigma: float, predicts: str,
                         scheme: str, favour: str, tau: float, clip: float,
                         v_offset: int = 0, normalizer: float | None = None, normalise: str = "batch",
                         t_bins: int = 1, t_all: torch.Tensor | None = None) -> LossOutput:
    """Reference of the fused loss: the drift loss of a chunk of the optimiser batch.

    v holds sg[V(x_t⁺)] of the whole optimiser batch (all micro-batches and ranks); this chunk
    is v[v_offset : v_offset + B]. x0 and ε are regenerated from the keys, so the caller never
    stores them. normalizer defaults to B (a plain weighted mean over the chunk); the trainer
    passes its per-rank batch size so that micro-batch losses add up to the batch mean.
    normalise/t_bins as in importance_weights; for t_bins, t_all holds the t of the whole
    optimiser batch in v's order (t_all[v_offset : v_offset + B] is this chunk's t).
    """
    checks.one_of("predicts", predicts, checks.PREDICTS)
    checks.one_of("scheme", scheme, checks.SCHEMES)
    checks.one_of("favour", favour, checks.FAVOURS)
    t_all = _check_t_bins(normalise, t_bins, t_all, v.numel(), "t_all")
    b = pred.shape[0]
    w_all = _importance_weights(v, scheme, favour, tau, clip, normalise, t_all, t_bins)
    w = w_all[v_offset: v_offset + b].to(pred.device)
    if predicts == "drift":
        x0, eps = draw_bridge_noise(seed, step, sample_index, x1.shape, x1.device)
        dt = torch.float64 if x1.dtype == torch.float64 else torch.float32
        target = drift_target(x1.to(dt), x0.to(dt), eps.to(dt), t.to(dt), sigma)
    else:  # x1
        target = x1
    loss, per_sample = weighted_mse(pred, target, w, float(b if normalizer is None else normalizer))
    return LossOutput(loss, per_sample, w)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(Σw)²/Σw² (a 0-dim tensor, no device sync): B for uniform weights, 1 when one sample
    takes all the weight."""
    return w.sum() ** 2 / w.square().sum()


def weight_ratio_bound(clip: float, tau: float) -> float:
    return math.exp(2 * clip / tau)
