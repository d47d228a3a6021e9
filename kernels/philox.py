"""Philox4x32-10 and Box–Muller as Triton device functions, bit-identical to agm_fast.rng's layout.

The layout (defined in agm_fast/rng.py, the reference these are tested against):
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (element // 4, global sample index, step, stream)
One call gives four uint32 words r0..r3; Box–Muller turns (r0, r1) into normals 0, 1 and
(r2, r3) into normals 2, 3, so element e of a sample is lane e % 4 of draw e // 4. The kernels
here draw a block of 4·Q elements as Q Philox calls and interleave the four lanes, so every
output of every draw is used (docs/design.md §8: these kernels are bound by Philox + Box–Muller).

Uniforms u = (r + 0.5)·2⁻³² in fp32 are bit-identical to the reference (an exact uint→fp32
rounding, one fp32 add, an exact scaling). Normals agree to float tolerance: log/sin/cos come
from a different math library (numpy under the interpreter; on sm_90, Triton 3.6 lowers
tl.log/sin/cos for fp32 to accurate polynomial code, not the MUFU approximations, as the PTX
shows). sqrt is the correctly rounded tl.sqrt_rn: tl.sqrt is sqrt.approx on GPU, and an
approximate log or sqrt near u = 1 would put 1e-4-sized errors into normals near 0.

Also here: the noise-only kernel and its wrapper noise_sum, which draw exactly the normals the
fused loss draws (streams X0 and EPS) and only reduce them: the Philox/Box–Muller cost limit
the benchmark reports. Launch helpers are in kernels/utils.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agm_fast import rng

from . import utils

# Philox4x32 constants (Random123); values ≥ 2³¹ become uint32 in Triton arithmetic.
PHILOX_M0 = tl.constexpr(rng.PHILOX_M0)
PHILOX_M1 = tl.constexpr(rng.PHILOX_M1)
PHILOX_W0 = tl.constexpr(rng.PHILOX_W0)
PHILOX_W1 = tl.constexpr(rng.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(rng.PHILOX_ROUNDS)
TWO_POW_M32 = tl.constexpr(rng.TWO_POW_M32)
TWO_PI = tl.constexpr(rng.TWO_PI)
STREAM_X0 = tl.constexpr(int(rng.Stream.X0))
STREAM_EPS = tl.constexpr(int(rng.Stream.EPS))


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Random123; same rounds as agm_fast.rng.philox4x32)."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(PHILOX_M1, prev_c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_M0, prev_c0) ^ c3 ^ k1
        c1 = tl.mul(PHILOX_M1, prev_c2, sanitize_overflow=False)
        c3 = tl.mul(PHILOX_M0, prev_c0, sanitize_overflow=False)
        # the key is bumped between rounds; a bump after the last round is never used
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform(r):
    """uint32 → fp32 uniform in (0, 1]: (r + 0.5)·2⁻³², never 0 so log() stays finite."""
    return (r.to(tl.float32) + 0.5) * TWO_POW_M32


@triton.jit
def box_muller(ra, rb):
    """Two uint32 words → two independent standard normals (fp32), as agm_fast.rng.box_muller."""
    u1 = uniform(ra)
    u2 = uniform(rb)
    radius = tl.sqrt_rn(-2.0 * tl.log(u1))
    theta = TWO_PI * u2
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def philox_words(draw, sample, step, stream, k0, k1):
    """The four words of draws `draw` (uint32 tensor) of one sample: counter (draw, sample, step, stream).

    sample, step, k0, k1 are uint32 scalars; stream is an int constant. The three constant
    counter words are broadcast to the block (cheaper special-casing of round 1 is not worth
    a second code path)."""
    zero = draw * 0
    return philox4x32_10(draw, zero + sample, zero + step, zero + stream, k0, k1)


@triton.jit
def normal_block(first_draw, sample, step, stream, k0, k1, BLOCK: tl.constexpr):
    """BLOCK consecutive normals of one sample starting at element 4·first_draw, in memory order.

    BLOCK // 4 Philox calls; the four lanes are interleaved with two joins and a reshape
    (lane i of draw q is element 4q + i), so all four outputs of each call are used.
    """
    draw = (first_draw + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    r0, r1, r2, r3 = philox_words(draw, sample, step, stream, k0, k1)
    z0, z1 = box_muller(r0, r1)
    z2, z3 = box_muller(r2, r3)
    # join(join(z0, z2), join(z1, z3))[q, i, j] = z_{2i + j}  → reshape gives z0 z1 z2 z3 per q
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(z, [BLOCK])


@triton.jit
def key_words(seed_lo, seed_hi, step, sample_index_ptr, b):
    """uint32 key words, step and sample index (low 32 bits of the int64) for sample row b."""
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    step_u32 = step.to(tl.uint32)
    sample = tl.load(sample_index_ptr + b).to(tl.uint32)
    return k0, k1, step_u32, sample


# ----------------------------------------------------------------------------- noise-only kernel

@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step"])
def _noise_sum_kernel(sample_index_ptr, partial_ptr, n_per_sample, seed_lo, seed_hi, step,
                      BLOCK: tl.constexpr):
    """Draw the X0 and EPS normals the fused loss draws and only reduce them (x0 + ε summed)."""
    pid_k = tl.program_id(0)
    b = tl.program_id(1)
    num_k = tl.num_programs(0)
    k0, k1, step_u32, sample = key_words(seed_lo, seed_hi, step, sample_index_ptr, b)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid_k * BLOCK, n_per_sample, num_k * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x0 = normal_block(start // 4, sample, step_u32, STREAM_X0, k0, k1, BLOCK)
        eps = normal_block(start // 4, sample, step_u32, STREAM_EPS, k0, k1, BLOCK)
        acc += tl.where(offs < n_per_sample, x0 + eps, 0.0)
    tl.store(partial_ptr + b * num_k + pid_k, tl.sum(acc, axis=0))


def noise_sum(seed: int, step: int, sample_index: torch.Tensor, n_per_sample: int) -> torch.Tensor:
    """Per-sample Σ(x0 + ε) over n elements [B] fp32: the noise-only cost limit for the bench.

    sample_index: int64 tensor [B] on the device to run on."""
    seed_lo, seed_hi = rng.split_seed(seed)
    device = sample_index.device
    interpreted = utils.is_interpreted(_noise_sum_kernel)
    block, num_k = utils.launch_config(device, n_per_sample, interpreted)
    b = sample_index.numel()
    partial = torch.empty((b, num_k), dtype=torch.float32, device=device)
    _noise_sum_kernel[(num_k, b)](sample_index, partial, n_per_sample, seed_lo, seed_hi, step,
                                  BLOCK=block, num_warps=4)
    return partial.sum(dim=1)
