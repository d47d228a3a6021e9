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
  * x0 (Stream.X0) and ε (Stream.EPS) regenerated in-kernel, u_t = x1 - x0 - σ·sqrt(t/(1-t))·ε
    (predicts=drift) or the target x1 (predicts=x1, no noise drawn);
  * the squared error summed into one fp32 partial per program, and d loss / d pred =
    2·w_b·(pred - target) / (n·normalizer) written in pred's dtype in the same pass.
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


# ----------------------------------------------------------------------------- the kernels

@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "n_v", "v_offset"])
def _weighted_bridge_loss_kernel(pred_ptr, x1_ptr, t_ptr, v_ptr, sample_index_ptr,
                                 grad_ptr, partial_ptr, weight_ptr,
                                 n_per_sample, n_v, v_offset, seed_lo, seed_hi, step,
                                 sigma, tau, clip, grad_scale,
                                 DRIFT_TARGET: tl.constexpr, SOFTMAX: tl.constexpr,
                                 SIGN: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                 BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
                                 BF16_RNE_BY_BITS: tl.constexpr):
    pid_k = tl.program_id(0)  # block of elements within the sample (one on the interpreter)
    b = tl.program_id(1)      # sample row of this chunk
    num_k = tl.num_programs(0)
    if SOFTMAX:
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
        pred = tl.load(pred_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(x1_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        if DRIFT_TARGET:
            x0 = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_X0, k0, k1, BLOCK)
            eps = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_EPS, k0, k1, BLOCK)
            target = target - x0 - noise_coef * eps  # u_t = x1 - x0 - σ·sqrt(t/(1-t))·ε
        diff = tl.where(mask, pred - target, 0.0)
        acc += diff * diff
        if WRITE_GRAD:
            grad = utils.to_output_dtype(elem_grad_scale * diff, grad_ptr, BF16_RNE_BY_BITS)
            tl.store(grad_ptr + row + offs, grad, mask=mask)
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

def _launch(pred, x1c, t32, v32, idx, *, n, seed_lo, seed_hi, step, sigma, predicts, scheme,
            favour, tau, clip, v_offset, normalizer, write_grad):
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
    grad = torch.empty_like(pred) if write_grad else partial  # an unused pointer when not writing
    n_v = v32.numel()
    _weighted_bridge_loss_kernel[(num_k, b)](
        pred, x1c, t32, v32, idx, grad, partial, weights,
        n, n_v, v_offset, seed_lo, seed_hi, step,
        sigma, tau, clip, 2.0 / (n * normalizer),
        DRIFT_TARGET=predicts == "drift", SOFTMAX=scheme == "softmax",
        SIGN=-1.0 if favour == "coherent" else 1.0, WRITE_GRAD=write_grad,
        BLOCK=block, BLOCK_V=min(max(triton.next_power_of_2(n_v), 16), MAX_V_BLOCK),
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
    def forward(ctx, pred, x1c, t32, v32, idx, params: dict):
        loss, per_sample, weights, grad = _launch(pred, x1c, t32, v32, idx, write_grad=True,
                                                  **params)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_sample, weights)
        return loss, per_sample, weights

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_sample, _grad_weights):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


# ----------------------------------------------------------------------------- the wrapper

def weighted_bridge_loss(pred: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                         *, seed: int, step: int, sample_index, sigma: float, predicts: str, scheme: str,
                         favour: str, tau: float, clip: float, v_offset: int = 0,
                         normalizer: float | None = None,
                         validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused drift loss of a chunk of the optimiser batch; mirrors bridge.weighted_bridge_loss.

    pred: [B, ...] fp32/bf16/fp16 network output (differentiable); x1: data of pred's shape
    (fp32/bf16/fp16, no grad); t: [B] in [0, 1); v: sg[V(x_t⁺)] of the whole optimiser batch
    (≥ v_offset + B values; this chunk is v[v_offset : v_offset + B]); sample_index: B global
    sample indices (int64 tensor, ideally already on pred's device). clip = float('inf') turns
    clipping off. normalizer defaults to B. validate=False skips the value check of t (one host
    sync on CUDA) for t the caller drew itself. Returns (loss, per_sample, weights): loss
    differentiable w.r.t. pred, per_sample and weights fp32 and detached. Non-contiguous inputs
    are copied to contiguous ones here.
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
    t32 = utils.prepare_t(t, b, validate)  # checked for predicts=x1 too, though unread there
    device = pred.device
    utils.check_device(device, utils.is_interpreted(_weighted_bridge_loss_kernel), x1=x1, t=t, v=v)
    idx = checks.sample_index(sample_index, b, device)
    v32 = v.detach().reshape(-1).to(torch.float32).contiguous()
    x1c = x1.detach().contiguous()
    params = dict(n=n, seed_lo=seed_lo, seed_hi=seed_hi, step=step, sigma=sigma,
                  predicts=predicts, scheme=scheme, favour=favour, tau=tau, clip=clip,
                  v_offset=v_offset, normalizer=normalizer)
    if pred.requires_grad and torch.is_grad_enabled():
        return WeightedBridgeLossFunction.apply(pred.contiguous(), x1c, t32, v32, idx, params)
    loss, per_sample, weights, _ = _launch(pred.detach().contiguous(), x1c, t32, v32, idx,
                                           write_grad=False, **params)
    return loss, per_sample, weights
