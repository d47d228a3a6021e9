"""Fused bridge sampling: x_t = (1-t)·x0 + t·x1 + σ·sqrt(t(1-t))·ε with x0, ε drawn in-kernel.

Owns the bridge-sampling kernel and its wrapper bridge_sample. Reads x1 and t, regenerates x0
(Stream.X0) and ε (Stream.EPS) from the Philox keys of agm_fast.rng (seed, step, global sample
index), and writes x_t. Neither x0 nor ε touches memory. x1 may be NHWC (channels_last): x_t
is written in the same layout, each element's noise keyed by its logical NCHW index
(utils.sample_offsets). Reference: agm_fast.bridge.bridge_sample(x1, t,
*bridge.draw_bridge_noise(...)). The wrapper checks its arguments (agm_fast.checks,
kernels/utils.py) before the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agm_fast import checks, rng

from . import philox, utils


# ----------------------------------------------------------------------------- the kernel

@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step"])
def _bridge_sample_kernel(x1_ptr, t_ptr, sample_index_ptr, xt_ptr, n_per_sample, n_channels, n_hw,
                          seed_lo, seed_hi, step, sigma,
                          CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, BF16_RNE_BY_BITS: tl.constexpr):
    pid_k = tl.program_id(0)  # block of elements within the sample (one on the interpreter)
    b = tl.program_id(1)      # sample row of the batch
    num_k = tl.num_programs(0)
    k0, k1, step_u32, sample = philox.key_words(seed_lo, seed_hi, step, sample_index_ptr, b)
    t = tl.load(t_ptr + b).to(tl.float32)
    one_minus_t = 1.0 - t
    noise_scale = sigma * tl.sqrt_rn(t * one_minus_t)  # σ·sqrt(t(1-t)), once per program
    row = b.to(tl.int64) * n_per_sample
    for start in range(pid_k * BLOCK, n_per_sample, num_k * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_per_sample
        mem = utils.sample_offsets(offs, n_channels, n_hw, CHANNELS_LAST)
        x1 = tl.load(x1_ptr + row + mem, mask=mask, other=0.0).to(tl.float32)
        x0 = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_X0, k0, k1, BLOCK)
        eps = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_EPS, k0, k1, BLOCK)
        xt = one_minus_t * x0 + t * x1 + noise_scale * eps
        tl.store(xt_ptr + row + mem, utils.to_output_dtype(xt, xt_ptr, BF16_RNE_BY_BITS), mask=mask)


# ----------------------------------------------------------------------------- the wrapper

def bridge_sample(x1: torch.Tensor, t: torch.Tensor, *, seed: int, step: int, sample_index,
                  sigma: float, validate: bool = True) -> torch.Tensor:
    """x_t of the Brownian bridge from in-kernel noise x0 to data x1 (docs/design.md §1), in x1's dtype.

    Equals agm_fast.bridge.bridge_sample(x1, t, *bridge.draw_bridge_noise(seed, step,
    sample_index, x1.shape)) to float tolerance, computed in fp32. x1: [B, ...] fp32/bf16/fp16,
    NCHW or channels_last (NHWC; x_t comes back in it, with the noise of each logical element
    unchanged, so the same values bit for bit); any other layout is copied to NCHW here; t: [B]
    in [0, 1); sample_index: B global sample indices (int64).
    validate=False skips the value check of t (one host sync on CUDA) for t the caller drew
    itself. No autograd: x1 is data.
    """
    checks.storage_tensor("x1", x1)
    b, n = utils.check_batch(x1)
    utils.check_no_grad("x1", x1)
    seed_lo, seed_hi = rng.split_seed(seed)
    checks.step(step)
    sigma = checks.sigma(sigma)
    t32 = utils.prepare_t(t, b, validate)
    interpreted = utils.is_interpreted(_bridge_sample_kernel)
    utils.check_device(x1.device, interpreted, t=t)
    idx = checks.sample_index(sample_index, b, x1.device)
    channels_last = utils.is_channels_last(x1)
    x1c = utils.dense(x1.detach(), channels_last)
    xt = torch.empty_like(x1c)  # x1c's strides: NHWC stays NHWC
    n_channels, n_hw = utils.layout_args(x1c, channels_last)
    block, num_k = utils.launch_config(x1.device, n, interpreted)
    _bridge_sample_kernel[(num_k, b)](x1c, t32, idx, xt, n, n_channels, n_hw, seed_lo, seed_hi, step, sigma,
                                      CHANNELS_LAST=channels_last, BLOCK=block,
                                      BF16_RNE_BY_BITS=utils.bf16_rne_by_bits(xt, interpreted), num_warps=4)
    return xt
