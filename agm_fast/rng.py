"""Counter-based noise: Philox4x32-10 normals keyed by (seed, step, global sample index, stream).

Every random number the trainer and sampler use is a pure function of its key, so results do
not depend on world size, micro-batching or how many kernels ran before (DESIGN.md §1 "Noise").
The Triton kernels (`agm_fast.kernels`) and the C++/CUDA op (`agm_fast._C`) draw the same
stream in-kernel; this file is the definition they are tested against.

Layout of one Philox call (Random123 philox4x32-10):
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (element // 4, global sample index, step, stream)
One call yields 4 uint32 words r0..r3; Box–Muller turns (r0, r1) into normals 0 and 1 and
(r2, r3) into normals 2 and 3, so element e of a sample is lane e % 4 of block e // 4: every
output of every draw is used. Uniforms in (0, 1) are u = (r + 0.5) · 2⁻³², computed in fp32.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
TWO_POW_M32 = 2.3283064365386963e-10  # 2⁻³², exact in fp32
TWO_PI = 6.283185307179586


class Stream(IntEnum):
    """Independent noise streams (the 4th counter word). Never renumber: it changes every run."""

    X0 = 0          # bridge start point x0 ~ N(0, I)
    EPS = 1         # bridge noise ε
    T = 2           # training times t
    NEGATIVES = 3   # structure-destroying permutations for degenerate bridges
    SAMPLE_X0 = 4   # sampler start point
    EM = 5          # Euler–Maruyama increments (step word = EM step index k)
    DATA = 6        # data augmentation (flips)


def split_seed(seed: int) -> tuple[int, int]:
    """A seed in [0, 2⁶⁴) → the two Philox key words (lo, hi)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed & MASK32, (seed >> 32) & MASK32


def check_step(step: int) -> int:
    """A step word (training step or EM step index k): an integer in [0, 2³²)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MASK32:
        raise ValueError(f"step must be an integer in [0, 2**32), got {step!r}")
    return step


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 multiply of two 32-bit values is exact (< 2⁶⁴ wraps only in sign, not in bits)
    p = x * m
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable); returns 4 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    k0 = torch.tensor(k0 & MASK32, dtype=torch.int64, device=c0.device)
    k1 = torch.tensor(k1 & MASK32, dtype=torch.int64, device=c0.device)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """uint32 (held in int64) → fp32 uniform in (0, 1]; never 0, so log() is finite."""
    return (r.to(torch.float32) + 0.5) * TWO_POW_M32


def box_muller(ra: torch.Tensor, rb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint32 words → two independent standard normals (fp32)."""
    u1 = uint_to_uniform(ra)
    u2 = uint_to_uniform(rb)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = TWO_PI * u2
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _sample_index(sample_index, device) -> torch.Tensor:
    idx = torch.as_tensor(sample_index, dtype=torch.int64, device=device).reshape(-1)
    # checked on the CPU only: on a GPU the check would cost a device sync per draw; the
    # trainer and sampler build their indices on the CPU side where they are checked once
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > MASK32):
        raise ValueError("global sample indices must lie in [0, 2**32)")
    return idx


def normal(seed: int, step: int, sample_index, numel: int, stream: Stream,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals, shape [len(sample_index), numel], fp32.

    Row b is a pure function of (seed, step, sample_index[b], stream): the rows for global
    samples [0, 2b) equal those of [0, b) followed by [b, 2b).
    """
    k0, k1 = split_seed(seed)
    idx = _sample_index(sample_index, device)
    nblocks = (numel + 3) // 4
    blocks = torch.arange(nblocks, dtype=torch.int64, device=idx.device)
    r0, r1, r2, r3 = philox4x32(blocks[None, :], idx[:, None], step, int(stream), k0, k1)
    z0, z1 = box_muller(r0, r1)
    z2, z3 = box_muller(r2, r3)
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(idx.numel(), nblocks * 4)
    return z[:, :numel]


def uniform(seed: int, step: int, sample_index, stream: Stream,
            device: torch.device | str = "cpu", numel: int = 1) -> torch.Tensor:
    """Uniforms in (0, 1], shape [len(sample_index), numel] fp32 (lane i%4 of block i//4)."""
    k0, k1 = split_seed(seed)
    idx = _sample_index(sample_index, device)
    nblocks = (numel + 3) // 4
    blocks = torch.arange(nblocks, dtype=torch.int64, device=idx.device)
    words = philox4x32(blocks[None, :], idx[:, None], step, int(stream), k0, k1)
    u = torch.stack([uint_to_uniform(w) for w in words], dim=-1).reshape(idx.numel(), nblocks * 4)
    return u[:, :numel]


def normal_like(shape: tuple[int, ...], seed: int, step: int, sample_index, stream: Stream,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Normals shaped [B, *shape[1:]] where B = len(sample_index); shape[0] is checked."""
    numel = math.prod(shape[1:])
    z = normal(seed, step, sample_index, numel, stream, device)
    if z.shape[0] != shape[0]:
        raise ValueError(f"{z.shape[0]} sample indices for a batch of {shape[0]}")
    return z.reshape(shape)
