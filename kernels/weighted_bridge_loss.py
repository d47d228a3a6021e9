"""Fused V-weighted bridge loss (paper Eq. 13) and its gradient in one pass over the data.

Owns the loss kernels, their launch, the torch.autograd.Function and the wrapper
weighted_bridge_loss, which returns a plain tuple (loss, per_sample, weights) (agm_fast.dispatch
wraps it into bridge.LossOutput). Reference: agm_fast.bridge.weighted_bridge_loss (same
arguments, same keys, so the same noise).

Kernel 1, one program per (block of ~1,024 elements, sample) on a GPU (one program per sample
looping over one big block under the interpreter):
  * the sample's importance weight w_b from the whole batch's V (docs/design.md §1): standardise
    with the population std (s = 0 when len(V) = 1 or std = 0), clamp ±clip, w = len(V)·
    softmax(∓s/τ), or w ≡ 1 for scheme=uniform. Every program recomputes it from V: a few
    loads and exps over len(V) floats (L2 hits), cheap next to 1,024 elements of Philox for the
    batch sizes of this trainer, and it keeps the whole loss at two launches with no host
    sync. The cost grows with len(V); at len(V) in the thousands a separate tiny pass would win;
    with normalise=t_bins (constexpr T_BINS; the batch path's code is untouched) it also reads
    the whole batch's t, ranks it (ties by position) and standardises V within t-quantile bins:
    three passes of [T_BLOCK_I, T_BLOCK_J] rank compares, O(len(V)²) per program, with the K
    bins' means and stds held in registers and picked by one-hot selects;
  * x0 (Stream.X0) and ε (Stream.EPS) regenerated in-kernel, u_t = x1 - x0 - σ·sqrt(t/(1-t))·ε
    (predicts=drift) or the target x1 (predicts=x1, no noise drawn);
  * the squared error summed into one fp32 partial per program, and d loss / d pred =
    2·w_b·(pred - target) / (n·normalizer) written in pred's dtype in the same pass;
  * NCHW or NHWC (channels_last, constexpr CHANNELS_LAST) pred, x1 and gradient: a sample is
    walked in logical NCHW order and only the addresses follow the layout
    (utils.sample_offsets), so the noise, sums and gradient are the NCHW path's bit for bit.
Kernel 2, one tiny program: per-sample means from the partials (a fixed order, so the result
is deterministic: no atomics), and loss = Σ_b w_b·mean_b / normalizer.

The autograd backward only rescales the stored gradient by grad_output. V gets no gradient
(it is sg[V] by definition); per-sample losses and weights come back detached for logging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agm_fast import checks, rng

from . import philox, utils

MAX_V_BLOCK = 1024
MAX_T_BINS = 1024  # bins held per program by the t_bins path (BLOCK_K); K ≥ len(V) needs none


# ----------------------------------------------------------------------------- device functions

@triton.jit
def _weight_logits(v, mean, std, tau, clip, SIGN: tl.constexpr):
    """∓clamp((v - mean)/std, -c, c)/τ, as agm_fast.bridge.importance_weights orders it."""
    s = tl.minimum(tl.maximum(tl.div_rn(v - mean, std), -clip), clip)
    return tl.div_rn(SIGN * s, tau)


@triton.jit
def importance_weight(v_ptr, n_v, j, tau, clip, SIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """w_j = n_v·softmax_j(∓s/τ) over all n_v values of V (1 when n_v = 1 or std(V) = 0)."""
    offs0 = tl.arange(0, BLOCK_V)
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_v, BLOCK_V):
        offs = start + offs0
        total += tl.load(v_ptr + offs, mask=offs < n_v, other=0.0)
    mean = tl.div_rn(tl.sum(total, axis=0), n_v.to(tl.float32))
    sq = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_v, BLOCK_V):
        offs = start + offs0
        mask = offs < n_v
        centred = tl.where(mask, tl.load(v_ptr + offs, mask=mask, other=0.0) - mean, 0.0)
        sq += centred * centred
    std = tl.sqrt_rn(tl.div_rn(tl.sum(sq, axis=0), n_v.to(tl.float32)))
    spread = std > 0
    safe_std = tl.where(spread, std, 1.0)
    running_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    for start in range(0, n_v, BLOCK_V):
        offs = start + offs0
        mask = offs < n_v
        logits = _weight_logits(tl.load(v_ptr + offs, mask=mask, other=0.0), mean, safe_std,
                                tau, clip, SIGN)
        running_max = tl.maximum(running_max, tl.where(mask, logits, float("-inf")))
    top = tl.max(running_max, axis=0)
    denom = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_v, BLOCK_V):
        offs = start + offs0
        mask = offs < n_v
        logits = _weight_logits(tl.load(v_ptr + offs, mask=mask, other=0.0), mean, safe_std,
                                tau, clip, SIGN)
        denom += tl.where(mask, tl.exp(logits - top), 0.0)
    own = tl.exp(_weight_logits(tl.load(v_ptr + j), mean, safe_std, tau, clip, SIGN) - top)
    w = n_v.to(tl.float32) * tl.div_rn(own, tl.sum(denom, axis=0))
    return tl.where(spread, w, 1.0)


@triton.jit
def _t_ranks(t_ptr, n_v, offs_i, mask_i, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Rank of each sample i in offs_i by t, ties broken by batch position:
    #{j : t_j < t_i or (t_j = t_i and j < i)} (an int32 [BLOCK_I], from [BLOCK_I, BLOCK_J] tiles)."""
    ti = tl.load(t_ptr + offs_i, mask=mask_i, other=0.0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for start in range(0, n_v, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        mask_j = offs_j < n_v
        tj = tl.load(t_ptr + offs_j, mask=mask_j, other=0.0)
        before = (tj[None, :] < ti[:, None]) | ((tj[None, :] == ti[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        rank += tl.sum((before & mask_j[None, :]).to(tl.int32), axis=1)
    return rank


@triton.jit
def _t_bin(rank, n_v, n_bins):
    """⌊r·K/B⌋ (int64 product: r·K can pass 2³¹ for long V)."""
    return ((rank.to(tl.int64) * n_bins) // n_v).to(tl.int32)


@triton.jit
def _bin_stats_of(bins, stats, BLOCK_K: tl.constexpr):
    """stats[bins[i]] for each i (a one-hot [BLOCK_I, BLOCK_K] select: no gathers from registers)."""
    ks = tl.arange(0, BLOCK_K)
    return tl.sum(tl.where(bins[:, None] == ks[None, :], stats[None, :], 0.0), axis=1)


@triton.jit
def _t_bin_logits(v_ptr, t_ptr, n_v, n_bins, offs_i, mask_i, mean, safe_std, spread, tau, clip,
                  SIGN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(∓s_i/τ, s_i ≠ 0) for the samples offs_i, s standardised within each one's t-bin."""
    bins = _t_bin(_t_ranks(t_ptr, n_v, offs_i, mask_i, BLOCK_I, BLOCK_J), n_v, n_bins)
    v = tl.load(v_ptr + offs_i, mask=mask_i, other=0.0)
    m = _bin_stats_of(bins, mean, BLOCK_K)
    sd = _bin_stats_of(bins, safe_std, BLOCK_K)
    has_spread = _bin_stats_of(bins, spread, BLOCK_K) > 0
    s = tl.where(has_spread, tl.div_rn(v - m, sd), 0.0)
    s = tl.minimum(tl.maximum(s, -clip), clip)
    return tl.div_rn(SIGN * s, tau), s != 0


@triton.jit
def importance_weight_t_bins(v_ptr, t_ptr, n_v, n_bins, j, tau, clip, SIGN: tl.constexpr,
                             BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """w_j = n_v·softmax_j(∓s/τ) over all n_v values of V, s standardised within t-quantile bins
    (docs/design.md §1): rank r by t (ties by position), bin ⌊r·K/n_v⌋, population std, s = 0 in a
    bin of one sample or equal V; 1 when every s is 0. Needs 1 ≤ K ≤ min(n_v, BLOCK_K). Each of
    its three passes ranks all of t: O(n_v²) compares per program."""
    ks = tl.arange(0, BLOCK_K)
    # bin k holds the ranks ceil(k·B/K) … ceil((k+1)·B/K) - 1: its size needs no counting
    k64 = ks.to(tl.int64)
    count = ((k64 + 1) * n_v + n_bins - 1) // n_bins - (k64 * n_v + n_bins - 1) // n_bins
    count_f = tl.where(ks < n_bins, count, 1).to(tl.float32)
    offs0 = tl.arange(0, BLOCK_I)
    # pass 1: each bin's mean
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, n_v, BLOCK_I):
        offs = start + offs0
        mask = offs < n_v
        bins = _t_bin(_t_ranks(t_ptr, n_v, offs, mask, BLOCK_I, BLOCK_J), n_v, n_bins)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        hit = (bins[:, None] == ks[None, :]) & mask[:, None]
        total += tl.sum(tl.where(hit, v[:, None], 0.0), axis=0)
    mean = tl.div_rn(total, count_f)
    # pass 2: each bin's population std
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, n_v, BLOCK_I):
        offs = start + offs0
        mask = offs < n_v
        bins = _t_bin(_t_ranks(t_ptr, n_v, offs, mask, BLOCK_I, BLOCK_J), n_v, n_bins)
        centred = tl.load(v_ptr + offs, mask=mask, other=0.0) - _bin_stats_of(bins, mean, BLOCK_K)
        hit = (bins[:, None] == ks[None, :]) & mask[:, None]
        sq += tl.sum(tl.where(hit, (centred * centred)[:, None], 0.0), axis=0)
    std = tl.sqrt_rn(tl.div_rn(sq, count_f))
    spread = tl.where(std > 0, 1.0, 0.0)
    safe_std = tl.where(std > 0, std, 1.0)
    # pass 3: online softmax over all logits (lane-wise running max and rescaled sums)
    lane_max = tl.full([BLOCK_I], float("-inf"), dtype=tl.float32)
    lane_sum = tl.zeros([BLOCK_I], dtype=tl.float32)
    any_s = tl.zeros([BLOCK_I], dtype=tl.int32)
    for start in range(0, n_v, BLOCK_I):
        offs = start + offs0
        mask = offs < n_v
        logits, nonzero = _t_bin_logits(v_ptr, t_ptr, n_v, n_bins, offs, mask, mean, safe_std, spread,
                                        tau, clip, SIGN, BLOCK_I, BLOCK_J, BLOCK_K)
        logits = tl.where(mask, logits, float("-inf"))
        new_max = tl.maximum(lane_max, logits)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.where(mask, tl.exp(logits - safe_max), 0.0)
        lane_max = new_max
        any_s = tl.maximum(any_s, (nonzero & mask).to(tl.int32))
    top = tl.max(lane_max, axis=0)
    denom = tl.sum(tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp(lane_max - top)), axis=0)
    own_offs = j + tl.zeros([BLOCK_I], dtype=tl.int32)  # sample j broadcast over the lanes
    own_logit, _ = _t_bin_logits(v_ptr, t_ptr, n_v, n_bins, own_offs, own_offs < n_v, mean, safe_std,
                                 spread, tau, clip, SIGN, BLOCK_I, BLOCK_J, BLOCK_K)
    own = tl.exp(tl.max(own_logit, axis=0) - top)
    w = n_v.to(tl.float32) * tl.div_rn(own, denom)
    return tl.where(tl.max(any_s, axis=0) > 0, w, 1.0)


# ----------------------------------------------------------------------------- the kernels

@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "n_v", "v_offset", "n_bins"])
def _weighted_bridge_loss_kernel(pred_ptr, x1_ptr, t_ptr, v_ptr, t_all_ptr, sample_index_ptr,
                                 grad_ptr, partial_ptr, weight_ptr,
                                 n_per_sample, n_channels, n_hw, n_v, v_offset, n_bins,
                                 seed_lo, seed_hi, step, sigma, tau, clip, grad_scale,
                                 CHANNELS_LAST: tl.constexpr, DRIFT_TARGET: tl.constexpr,
                                 SOFTMAX: tl.constexpr, SIGN: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                 T_BINS: tl.constexpr,
                                 BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                 T_BLOCK_I: tl.constexpr, T_BLOCK_J: tl.constexpr,
                                 BF16_RNE_BY_BITS: tl.constexpr):
    pid_k = tl.program_id(0)  # block of elements within the sample (one on the interpreter)
    b = tl.program_id(1)      # sample row of this chunk
    num_k = tl.num_programs(0)
    if SOFTMAX and T_BINS:  # normalise=t_bins (t_all_ptr: the whole batch's t, in V's order)
        w = importance_weight_t_bins(v_ptr, t_all_ptr, n_v, n_bins, v_offset + b, tau, clip, SIGN,
                                     T_BLOCK_I, T_BLOCK_J, BLOCK_K)
    elif SOFTMAX:  # normalise=batch
        w = importance_weight(v_ptr, n_v, v_offset + b, tau, clip, SIGN, BLOCK_V)
    else:
        w = tl.full([], 1.0, tl.float32)
    tl.store(weight_ptr + b, w, mask=pid_k == 0)
    # d/dpred of Σ_b w_b·mean_e((pred - u)²)/normalizer = 2·w_b·(pred - u)/(n·normalizer)
    elem_grad_scale = w * grad_scale
    if DRIFT_TARGET:
        k0, k1, step_u32, sample = philox.key_words(seed_lo, seed_hi, step, sample_index_ptr, b)
        t = tl.load(t_ptr + b).to(tl.float32)
        noise_coef = sigma * tl.sqrt_rn(tl.div_rn(t, 1.0 - t))  # σ·sqrt(t/(1-t)): u_t's ε term
    row = b.to(tl.int64) * n_per_sample
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid_k * BLOCK, n_per_sample, num_k * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_per_sample
        mem = utils.sample_offsets(offs, n_channels, n_hw, CHANNELS_LAST)
        pred = tl.load(pred_ptr + row + mem, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(x1_ptr + row + mem, mask=mask, other=0.0).to(tl.float32)
        if DRIFT_TARGET:
            x0 = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_X0, k0, k1, BLOCK)
            eps = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_EPS, k0, k1, BLOCK)
            target = target - x0 - noise_coef * eps  # u_t = x1 - x0 - σ·sqrt(t/(1-t))·ε
        diff = tl.where(mask, pred - target, 0.0)
        acc += diff * diff
        if WRITE_GRAD:
            grad = utils.to_output_dtype(elem_grad_scale * diff, grad_ptr, BF16_RNE_BY_BITS)
            tl.store(grad_ptr + row + mem, grad, mask=mask)
    tl.store(partial_ptr + b * num_k + pid_k, tl.sum(acc, axis=0))


@triton.jit
def _finalize_kernel(partial_ptr, weight_ptr, per_sample_ptr, loss_ptr, n_rows, num_k,
                     n_per_sample_f, normalizer, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """per_sample[b] = Σ_k partial[b, k] / n;  loss = Σ_b w_b·per_sample[b] / normalizer."""
    rows0 = tl.arange(0, BLOCK_B)
    cols0 = tl.arange(0, BLOCK_K)
    weighted = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_B):
        rows = r0 + rows0
        row_mask = rows < n_rows
        sums = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in range(0, num_k, BLOCK_K):
            cols = c0 + cols0
            mask = row_mask[:, None] & (cols < num_k)[None, :]
            tile = tl.load(partial_ptr + rows[:, None] * num_k + cols[None, :], mask=mask, other=0.0)
            sums += tl.sum(tile, axis=1)
        per_sample = tl.div_rn(sums, n_per_sample_f)
        tl.store(per_sample_ptr + rows, per_sample, mask=row_mask)
        w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
        weighted += tl.where(row_mask, w * per_sample, 0.0)
    tl.store(loss_ptr, tl.div_rn(tl.sum(weighted, axis=0), normalizer))


# ----------------------------------------------------------------------------- launch

def _t_bin_tiles(n_v: int, interpreted: bool) -> tuple[int, int]:
    """(T_BLOCK_I, T_BLOCK_J) of the t_bins path: [I, J] rank compares and [I, BLOCK_K] bin selects per
    step; on a GPU small tiles (registers), under the interpreter (which pays per tile op) up to 256²."""
    if interpreted:
        size = min(max(triton.next_power_of_2(n_v), 16), 256)
        return size, size
    return 16, 64


def _launch(pred, x1c, t32, v32, t_all32, idx, *, n, channels_last, seed_lo, seed_hi, step, sigma, predicts,
            scheme, favour, tau, clip, v_offset, normalizer, n_bins, write_grad):
    """Run both kernels; returns (loss [], per_sample [B], weights [B], grad like pred or None)."""
    b = pred.shape[0]
    device = pred.device
    interpreted = utils.is_interpreted(_weighted_bridge_loss_kernel)
    block, num_k = utils.launch_config(device, n, interpreted)
    # one allocation for the small outputs: [loss | weights (B) | per_sample (B) | partials (B·K)]
    workspace = torch.empty(1 + 2 * b + b * num_k, dtype=torch.float32, device=device)
    loss = workspace[0]
    weights = workspace[1: 1 + b]
    per_sample = workspace[1 + b: 1 + 2 * b]
    partial = workspace[1 + 2 * b:]
    grad = torch.empty_like(pred) if write_grad else partial  # pred's strides; unused when not writing
    n_channels, n_hw = utils.layout_args(pred, channels_last)
    n_v = v32.numel()
    # t_bins with K ≥ len(V) puts every sample alone in its bin: s ≡ 0, so w ≡ 1 (no ranking needed)
    t_bins = t_all32 is not None and 1 < n_bins < n_v
    t_block_i, t_block_j = _t_bin_tiles(n_v, interpreted)
    _weighted_bridge_loss_kernel[(num_k, b)](
        pred, x1c, t32, v32, t_all32 if t_bins else v32, idx, grad, partial, weights,
        n, n_channels, n_hw, n_v, v_offset, n_bins if t_bins else 1, seed_lo, seed_hi, step,
        sigma, tau, clip, 2.0 / (n * normalizer), CHANNELS_LAST=channels_last,
        DRIFT_TARGET=predicts == "drift",
        SOFTMAX=scheme == "softmax" and not (t_all32 is not None and n_bins >= n_v),
        SIGN=-1.0 if favour == "coherent" else 1.0, WRITE_GRAD=write_grad, T_BINS=t_bins,
        BLOCK=block, BLOCK_V=min(max(triton.next_power_of_2(n_v), 16), MAX_V_BLOCK),
        BLOCK_K=max(triton.next_power_of_2(n_bins), 16) if t_bins else 16,
        T_BLOCK_I=t_block_i, T_BLOCK_J=t_block_j,
        BF16_RNE_BY_BITS=utils.bf16_rne_by_bits(grad, interpreted), num_warps=4)
    # one program reduces all partials: a [rows, K] tile of ≤ 8,192 floats per step, so the
    # largest bench shape (256 samples × 192 blocks) takes 6 dependent steps, most take one
    block_k = min(max(triton.next_power_of_2(num_k), 16), 256)
    block_b = min(max(triton.next_power_of_2(b), 16), max(8192 // block_k, 16))
    _finalize_kernel[(1,)](partial, weights, per_sample, loss, b, num_k, float(n), normalizer,
                           BLOCK_B=block_b, BLOCK_K=block_k, num_warps=8)
    return loss, per_sample, weights, (grad if write_grad else None)


class WeightedBridgeLossFunction(torch.autograd.Function):
    """Forward runs the fused pass (which also writes d loss/d pred); backward rescales it."""

    @staticmethod
    def forward(ctx, pred, x1c, t32, v32, t_all32, idx, params: dict):
        loss, per_sample, weights, grad = _launch(pred, x1c, t32, v32, t_all32, idx, write_grad=True,
                                                  **params)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_sample, weights)
        return loss, per_sample, weights

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_sample, _grad_weights):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None


# ----------------------------------------------------------------------------- the wrapper

def weighted_bridge_loss(pred: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                         *, seed: int, step: int, sample_index, sigma: float, predicts: str, scheme: str,
                         favour: str, tau: float, clip: float, v_offset: int = 0,
                         normalizer: float | None = None, normalise: str = "batch", t_bins: int = 1,
                         t_all: torch.Tensor | None = None,
                         validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused drift loss of a chunk of the optimiser batch; mirrors bridge.weighted_bridge_loss.

    pred: [B, ...] fp32/bf16/fp16 network output (differentiable); x1: data of pred's shape
    (fp32/bf16/fp16, no grad); t: [B] in [0, 1); v: sg[V(x_t⁺)] of the whole optimiser batch
    (≥ v_offset + B values; this chunk is v[v_offset : v_offset + B]); sample_index: B global
    sample indices (int64 tensor, ideally already on pred's device). clip = float('inf') turns
    clipping off. normalizer defaults to B. validate=False skips the value check of t (one host
    sync on CUDA) for t the caller drew itself. Returns (loss, per_sample, weights): loss
    differentiable w.r.t. pred, per_sample and weights fp32 and detached. pred may be NCHW or
    channels_last (NHWC): the kernel addresses that layout, x1 is brought into it (no copy when
    it already is), d loss/d pred has it, and every value equals the NCHW one bit for bit (the
    noise is keyed by the logical element index). Other layouts are copied to NCHW here.
    normalise=t_bins standardises V within t-quantile bins (t_bins = K of them) of the whole
    optimiser batch, whose t t_all holds in v's order (as many values as v); normalise=batch (the
    default) ignores t_all and t_bins.
    """
    checks.storage_tensor("pred", pred)
    checks.storage_tensor("x1", x1)
    if pred.shape != x1.shape:
        raise ValueError(f"pred and x1 must have the same shape, got {tuple(pred.shape)} and {tuple(x1.shape)}")
    b, n = utils.check_batch(x1)
    utils.check_no_grad("x1", x1)
    checks.one_of("predicts", predicts, checks.PREDICTS)
    checks.one_of("scheme", scheme, checks.SCHEMES)
    checks.one_of("favour", favour, checks.FAVOURS)
    tau = checks.number("tau", tau, positive=True)
    clip = checks.number("clip", clip, allow_inf=True)
    sigma = checks.sigma(sigma)
    seed_lo, seed_hi = rng.split_seed(seed)
    checks.step(step)
    if isinstance(v_offset, bool) or not isinstance(v_offset, int) or v_offset < 0:
        raise ValueError(f"v_offset must be an integer >= 0, got {v_offset!r}")
    normalizer = float(b) if normalizer is None else checks.number("normalizer", normalizer, positive=True)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        got = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else type(v).__name__
        raise TypeError(f"v must be a floating-point tensor of the batch's potentials, got {got}")
    if v.numel() < v_offset + b:
        raise ValueError(f"v holds {v.numel()} values but this chunk needs v[{v_offset}:{v_offset + b}] "
                         f"(v_offset={v_offset}, B={b}): pass the whole optimiser batch's V")
    checks.one_of("normalise", normalise, checks.NORMALISE)
    if isinstance(t_bins, bool) or not isinstance(t_bins, int) or t_bins < 1:
        raise ValueError(f"t_bins must be an integer >= 1, got {t_bins!r}")
    t_all32 = None
    if normalise == "t_bins":
        if not isinstance(t_all, torch.Tensor) or not t_all.is_floating_point():
            raise TypeError("normalise='t_bins' needs t_all, a floating-point tensor of the whole optimiser "
                            "batch's times (one per value of v)")
        if t_all.numel() != v.numel():
            raise ValueError(f"t_all holds {t_all.numel()} times but v holds {v.numel()} values: pass the "
                             f"whole optimiser batch's t, in v's order")
        if MAX_T_BINS < t_bins < v.numel():
            raise ValueError(f"the fused loss takes t_bins <= {MAX_T_BINS} (or >= len(v)), got {t_bins} "
                             f"for {v.numel()} values of V; use train.kernels=torch")
        t_all32 = t_all.detach().reshape(-1).to(torch.float32).contiguous()
    t32 = utils.prepare_t(t, b, validate)  # checked for predicts=x1 too, though unread there
    device = pred.device
    on_device = dict(x1=x1, t=t, v=v, **({} if t_all32 is None else dict(t_all=t_all)))
    utils.check_device(device, utils.is_interpreted(_weighted_bridge_loss_kernel), **on_device)
    idx = checks.sample_index(sample_index, b, device)
    v32 = v.detach().reshape(-1).to(torch.float32).contiguous()
    channels_last = utils.is_channels_last(pred)  # the layout follows pred, so its gradient has it
    x1c = utils.dense(x1.detach(), channels_last)
    params = dict(n=n, channels_last=channels_last, seed_lo=seed_lo, seed_hi=seed_hi, step=step,
                  sigma=sigma, predicts=predicts, scheme=scheme, favour=favour, tau=tau, clip=clip,
                  v_offset=v_offset, normalizer=normalizer, n_bins=t_bins)
    if pred.requires_grad and torch.is_grad_enabled():
        return WeightedBridgeLossFunction.apply(utils.dense(pred, channels_last), x1c, t32, v32, t_all32, idx,
                                                params)
    loss, per_sample, weights, _ = _launch(utils.dense(pred.detach(), channels_last), x1c, t32, v32, t_all32,
                                           idx, write_grad=False, **params)
    return loss, per_sample, weights
