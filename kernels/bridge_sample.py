"""Fused bridge sampling: x_t = (1-t)·x0 + t·x1 + σ·sqrt(t(1-t))·ε with x0, ε drawn in-kernel.

Reads x1 and t, regenerates x0 (Stream.X0) and ε (Stream.EPS) from the Philox keys of
agm_fast.rng (seed, step, global sample index), and writes x_t. Neither x0 nor ε touches
memory. Reference: agm_fast.bridge.bridge_sample(x1, t, *bridge.draw_bridge_noise(...)).

Also holds the argument checks shared with the fused loss (kernels/weighted_bridge_loss.py):
every bad input is a one-line ValueError/TypeError from here, before any kernel launches.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from agm_fast import rng
from agm_fast.bridge import check_sigma

from . import philox

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ELEMENTS_PER_SAMPLE = 2**31 - 2**20  # int32 element offsets inside a sample, with headroom


# ----------------------------------------------------------------------------- the kernel

@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step"])
def _bridge_sample_kernel(x1_ptr, t_ptr, sample_index_ptr, xt_ptr, n_per_sample,
                          seed_lo, seed_hi, step, sigma,
                          BLOCK: tl.constexpr, BF16_RNE_BY_BITS: tl.constexpr):
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
        x1 = tl.load(x1_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_X0, k0, k1, BLOCK)
        eps = philox.normal_block(start // 4, sample, step_u32, philox.STREAM_EPS, k0, k1, BLOCK)
        xt = one_minus_t * x0 + t * x1 + noise_scale * eps
        tl.store(xt_ptr + row + offs, philox.to_output_dtype(xt, xt_ptr, BF16_RNE_BY_BITS), mask=mask)


# ----------------------------------------------------------------------------- argument checks

def check_float_tensor(name: str, x, allowed=KERNEL_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def check_batch(x1: torch.Tensor) -> tuple[int, int]:
    """(B, elements per sample) of x1 [B, ...]."""
    if x1.dim() < 2:
        raise ValueError(f"x1 must be [B, ...] with at least 2 dims, got shape {tuple(x1.shape)}")
    b = x1.shape[0]
    n = x1[0].numel() if b else math.prod(x1.shape[1:])
    if b < 1 or n < 1:
        raise ValueError(f"x1 must hold at least one sample of at least one element, got shape {tuple(x1.shape)}")
    if n > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"x1 has {n} elements per sample; the kernels take at most {MAX_ELEMENTS_PER_SAMPLE}")
    return b, n


def check_no_grad(name: str, x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad: the fused kernels differentiate only the "
                         f"prediction (use agm_fast.bridge for gradients w.r.t. {name})")


def check_device(device: torch.device, interpreted: bool) -> None:
    if device.type == "cuda" or interpreted:
        return
    raise ValueError(f"the Triton kernels run on CUDA tensors (or on CPU only with TRITON_INTERPRET=1 "
                     f"set before triton is imported); got tensors on {device}")


def check_same_device(device: torch.device, **tensors) -> None:
    for name, x in tensors.items():
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but x1 is on {device}; put them on one device")


def prepare_t(t, b: int, device: torch.device, validate: bool = True) -> torch.Tensor:
    """t as a contiguous fp32 [B] tensor; with validate, every value finite and in [0, 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor of B={b} times, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got {str(t.dtype).replace('torch.', '')}")
    if t.numel() != b:
        raise ValueError(f"t must hold one time per sample (B={b}), got shape {tuple(t.shape)}")
    check_same_device(device, t=t)
    t32 = t.detach().reshape(-1).to(torch.float32).contiguous()
    if validate:
        # NaN fails both comparisons, so this also rejects non-finite t; one host sync on CUDA
        if not bool(((t32 >= 0) & (t32 < 1)).all()):
            bad = t32[~((t32 >= 0) & (t32 < 1))][0].item()
            raise ValueError(f"t must be finite and in [0, 1) (the drift divides by 1 - t), got {bad}")
    return t32


def prepare_sample_index(sample_index, b: int, device: torch.device) -> torch.Tensor:
    """Global sample indices as a contiguous int64 [B] tensor on `device`.

    Values must lie in [0, 2**32) (the Philox counter word); checked here for host data, and
    for device tensors left to the caller (a check would cost a device→host sync per call)."""
    if isinstance(sample_index, torch.Tensor):
        if sample_index.is_floating_point() or sample_index.is_complex() or sample_index.dtype == torch.bool:
            raise TypeError(f"sample_index must be an integer tensor, got {str(sample_index.dtype).replace('torch.', '')}")
        idx = sample_index.detach().reshape(-1)
    else:
        try:
            idx = torch.as_tensor(sample_index, dtype=torch.int64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"sample_index must be an int64 tensor or a sequence of ints: {e}") from None
    if idx.numel() != b:
        raise ValueError(f"sample_index must hold one global index per sample (B={b}), got {idx.numel()}")
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2**32):
        raise ValueError("sample_index values must lie in [0, 2**32)")
    return idx.to(device=device, dtype=torch.int64).contiguous()


# ----------------------------------------------------------------------------- the wrapper

def bridge_sample(x1: torch.Tensor, t: torch.Tensor, *, seed: int, step: int, sample_index,
                  sigma: float, validate: bool = True) -> torch.Tensor:
    """x_t of the Brownian bridge from in-kernel noise x0 to data x1 (DESIGN.md §1), in x1's dtype.

    Equals agm_fast.bridge.bridge_sample(x1, t, *bridge.draw_bridge_noise(seed, step,
    sample_index, x1.shape)) to float tolerance, computed in fp32. x1: [B, ...] fp32/bf16/fp16
    (made contiguous here); t: [B] in [0, 1); sample_index: B global sample indices (int64).
    validate=False skips the value check of t (one host sync on CUDA) for t the caller drew
    itself. No autograd: x1 is data.
    """
    check_float_tensor("x1", x1)
    b, n = check_batch(x1)
    check_no_grad("x1", x1)
    seed_lo, seed_hi = rng.split_seed(seed)
    rng.check_step(step)
    sigma = check_sigma(sigma)
    interpreted = philox.is_interpreted(_bridge_sample_kernel)
    check_device(x1.device, interpreted)
    t32 = prepare_t(t, b, x1.device, validate)
    idx = prepare_sample_index(sample_index, b, x1.device)
    x1c = x1.detach().contiguous()
    xt = torch.empty_like(x1c)
    block, num_k = philox.launch_config(x1.device, n, interpreted)
    _bridge_sample_kernel[(num_k, b)](x1c, t32, idx, xt, n, seed_lo, seed_hi, step, sigma,
                                      BLOCK=block,
                                      BF16_RNE_BY_BITS=philox.bf16_rne_by_bits(xt, interpreted),
                                      num_warps=4)
    return xt
