"""Launch helpers and argument checks shared by the Triton kernels (Liger-Kernel's ops/utils.py).

Owns what every kernel wrapper needs besides its own kernels: whether Triton runs in its CPU
interpreter, the launch layout (block size, programs per sample), the NCHW or NHWC
(channels_last) addressing of a sample walked in logical order, the bf16 output rounding
under the interpreter, and the tensor checks of the wrappers' public entry points (batch
layout, no grad on data, one device, t). The checks of scalars, sample indices and storage
dtypes shared with the rest of the ops are agm_fast.checks. The wrappers run both before any
kernel launches, so every bad input is a one-line ValueError/TypeError; the kernels trust
what passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ELEMENTS_PER_SAMPLE = 2**31 - 2**20  # int32 element offsets inside a sample, with headroom


# ----------------------------------------------------------------------------- launch

def is_interpreted(kernel) -> bool:
    """Whether `kernel` was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def launch_config(device: torch.device, n_per_sample: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK elements per program step, programs per sample) for one sample of n elements.

    GPU: 1,024-element blocks, one program per block (measured 2–3× faster than 4,096,
    docs/design.md §8). Interpreter: one program per sample with one big block it loops over
    (the interpreter pays per block step, not per element)."""
    if interpreted or device.type != "cuda":
        block = min(max(triton.next_power_of_2(n_per_sample), 16), 16384)
        return block, 1
    block = 1024
    return block, triton.cdiv(n_per_sample, block)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x is a dense NHWC (torch.channels_last) 4-D tensor that is not also NCHW-contiguous
    (C = 1 or H = W = 1 are both: those take the NCHW path, whose addresses are the same)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def dense(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x itself when it is dense in the layout a kernel addresses (NHWC or NCHW), else a copy into it."""
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def layout_args(x: torch.Tensor, channels_last: bool) -> tuple[int, int]:
    """(C, H·W) for sample_offsets: the NHWC map's sizes; (1, n) on the NCHW path, which ignores them."""
    n = x[0].numel()
    return (x.shape[1], n // x.shape[1]) if channels_last else (1, n)


@triton.jit
def sample_offsets(offs, n_channels, n_hw, CHANNELS_LAST: tl.constexpr):
    """Memory offsets within one sample of the logical (NCHW) element indices offs.

    The kernels walk a sample in logical order, so the Philox noise of element e = c·H·W + h·W + w
    is the same whatever the layout (and every output of each draw is still used, docs/design.md §8);
    in NHWC, element e lives at (h·W + w)·C + c. NCHW: offs itself (the code is unchanged)."""
    if CHANNELS_LAST:
        c = offs // n_hw
        return (offs - c * n_hw) * n_channels + c
    else:
        return offs


def bf16_rne_by_bits(out: torch.Tensor, interpreted: bool) -> bool:
    """The BF16_RNE_BY_BITS flag of to_output_dtype for an output tensor."""
    return interpreted and out.dtype == torch.bfloat16


@triton.jit
def to_output_dtype(x, out_ptr, BF16_RNE_BY_BITS: tl.constexpr):
    """fp32 → out_ptr's element type, rounding to nearest even.

    Triton 3.6's interpreter truncates fp32 → bf16 casts (the GPU rounds to nearest even), so
    under the interpreter bf16 outputs are rounded here by integer arithmetic instead."""
    if BF16_RNE_BY_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


# ----------------------------------------------------------------------------- argument checks

def check_batch(x1: torch.Tensor) -> tuple[int, int]:
    """(B, elements per sample) of x1 [B, ...] (a tensor of a storage dtype)."""
    if x1.dim() < 2 or x1.numel() == 0:
        raise ValueError(f"x1 must be [B, ...] with at least 2 dims and at least one sample of at least one "
                         f"element, got shape {tuple(x1.shape)}")
    b = x1.shape[0]
    n = x1.numel() // b
    if n > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"x1 has {n} elements per sample; the kernels take at most {MAX_ELEMENTS_PER_SAMPLE}")
    return b, n


def check_no_grad(name: str, x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad: the fused kernels differentiate only the "
                         f"prediction (use agm_fast.bridge for gradients w.r.t. {name})")


def check_device(device: torch.device, interpreted: bool, **tensors: torch.Tensor) -> None:
    """The kernels run on `device` (CUDA, or CPU under the interpreter); every named tensor is there."""
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"the Triton kernels run on CUDA tensors (or on CPU only with TRITON_INTERPRET=1 "
                         f"set before triton is imported); got tensors on {device}")
    for name, x in tensors.items():
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the kernel's other inputs are on {device}; "
                             f"put them on one device")


def prepare_t(t, b: int, validate: bool) -> torch.Tensor:
    """t as a contiguous fp32 [B] tensor on t's device; with validate, every value finite and in [0, 1)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"t must be a floating-point tensor of B={b} times, got {got}")
    if t.numel() != b:
        raise ValueError(f"t must hold one time per sample (B={b}), got shape {tuple(t.shape)}")
    t32 = t.detach().reshape(-1).to(torch.float32).contiguous()
    if validate:
        # NaN fails both comparisons, so this also rejects non-finite t; one host sync on CUDA
        inside = (t32 >= 0) & (t32 < 1)
        if not bool(inside.all()):
            raise ValueError(f"t must be finite and in [0, 1) (the drift divides by 1 - t), "
                             f"got {t32[~inside][0].item()}")
    return t32
