"""Counter-based noise: Philox4x32-10 normals keyed by (seed, step, global sample index, stream).

Every random number the trainer and sampler use is a pure function of its key, so results do
not depend on world size, micro-batching or how many kernels ran before (docs/design.md §1
"Noise"). The Triton kernels (`agm_fast.kernels`) and the C++/CUDA op (`agm_fast._C`) draw the
same stream in-kernel; this file owns the definition they are tested against: the Philox
constants, the stream numbers, the key layout and the reference generators. The checks of the
key parts (seed, step, sample indices) live in agm_fast.checks.

Layout of one Philox call (Random123 philox4x32-10):
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (element // 4, global sample index, step, stream)
One call yields 4 uint32 words r0..r3; Box–Muller turns (r0, r1) into normals 0 and 1 and
(r2, r3) into normals 2 and 3, so element e of a sample is lane e % 4 of block e // 4: every
output of every draw is used. Uniforms are u = (r + 0.5) · 2⁻³² computed in fp32: in (0, 1] (the
largest words round up to exactly 1.0 in fp32, so t = t_min + (1 - t_eps - t_min)·u reaches 1 - t_eps).
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

from . import checks
from .checks import MASK32
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
    """A seed in [0, 2⁶⁴) (checked) → the two Philox key words (lo, hi)."""
    seed = checks.seed(seed)
    return seed & MASK32, (seed >> 32) & MASK32


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 multiply of two 32-bit values is exact (< 2⁶⁴ wraps only in sign, not in bits)
    p = x * m
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable); returns 4 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    # the keys stay Python ints (the round keys are constants of the seed): no host→device copy,
    # so the noise can be captured in a CUDA graph and traced by torch.compile
    k0, k1 = k0 & MASK32, k1 & MASK32
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


def normal(seed: int, step: int, sample_index, numel: int, stream: Stream,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals, shape [len(sample_index), numel], fp32.

    Row b is a pure function of (seed, step, sample_index[b], stream): the rows for global
    samples [0, 2b) equal those of [0, b) followed by [b, 2b).
    """
    k0, k1 = split_seed(seed)
    return _normal(k0, k1, step, checks.sample_index(sample_index, None, device), numel, stream)


def _normal(k0: int, k1: int, step: int, idx: torch.Tensor, numel: int, stream: Stream) -> torch.Tensor:
    """normal() for checked key words and indices."""
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
    idx = checks.sample_index(sample_index, None, device)
    nblocks = (numel + 3) // 4
    blocks = torch.arange(nblocks, dtype=torch.int64, device=idx.device)
    words = philox4x32(blocks[None, :], idx[:, None], step, int(stream), k0, k1)
    u = torch.stack([uint_to_uniform(w) for w in words], dim=-1).reshape(idx.numel(), nblocks * 4)
    return u[:, :numel]


def normal_like(shape: tuple[int, ...], seed: int, step: int, sample_index, stream: Stream,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Normals shaped `shape` = [B, ...]; sample_index must hold B global sample indices."""
    k0, k1 = split_seed(seed)
    idx = checks.sample_index(sample_index, shape[0], device)
    return _normal(k0, k1, step, idx, math.prod(shape[1:]), stream).reshape(shape)
