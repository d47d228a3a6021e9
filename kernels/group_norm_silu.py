"""Fused GroupNorm + SiLU (+ the time-embedding add or scale/shift), forward and backward.

Owns the kernels, their launch, the torch.autograd.Function and the wrapper group_norm_silu
(docs/design.md §2, §3; issue 10). Reference: the module composition it replaces,

    z = F.group_norm(x, G, γ, β, eps)
    y = F.silu(z)                       mode 'none'        (ResBlock.norm1, DriftUNet.norm_out)
    y = F.silu(z + e[:, :, None, None]) mode 'add'         (ResBlock.norm2, model.time_injection=add)
    y = F.silu(z·(1 + s) + b)           mode 'scale_shift' (ADM, model.time_injection=scale_shift)

x is [N, C, H, W] (or [N, C, *]) in fp32, bf16 or fp16, in NCHW or channels_last (NHWC) memory;
the output has x's dtype and memory format. Statistics and all arithmetic are fp32: mean first,
then the centred sum of squares (population variance, as F.group_norm), rstd = 1/sqrt(var + eps).

Forward kernel, one program per (sample, group): a [BLOCK_HW, BLOCK_C] tile (positions ×
the group's channels) walks the group three times: Σx → mean, Σ(x − mean)² → rstd, then the
output; mean and rstd are stored for the backward. The same tile addresses both layouts through
the channel and position strides (NCHW: C·stride 1 along positions; NHWC: along channels).
Backward kernel, one program per (sample, group): one pass recomputes x̂, z, the SiLU input a and
da = dy·σ(a)(1 + a(1 − σ(a))), and reduces per channel Σda (de or db), Σda·z (ds), Σdz·x̂ and Σdz
(this sample's share of dγ, dβ), and per group Σdx̂, Σdx̂·x̂; a second pass writes
dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)). dγ and dβ are the sums over samples of the [N, C]
partials, done in torch in a fixed order (deterministic, no atomics).

Large groups (256², 128 channels / 32 groups = 262k elements) run as one program each; a two-pass
split over programs per group is not built (GPU speed unmeasured, issue 10).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agm_fast import checks

from . import utils

MODES = ("none", "add", "scale_shift")
_MODE_ID = {"none": 0, "add": 1, "scale_shift": 2}


# ----------------------------------------------------------------------------- the kernels

@triton.jit
def _tile(x_ptr, base, hw0, n_hw, c_offs, cpg, stride_c, stride_hw, BLOCK_HW: tl.constexpr):
    """(offsets, mask, fp32 values) of the tile of positions hw0 … hw0 + BLOCK_HW of one group."""
    hw = hw0 + tl.arange(0, BLOCK_HW)
    mask = (hw < n_hw)[:, None] & (c_offs < cpg)[None, :]
    offs = base + hw.to(tl.int64)[:, None] * stride_hw + c_offs.to(tl.int64)[None, :] * stride_c
    return offs, mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group(n_hw, cpg, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """This program's (sample n, group g): the group count G, its channel offsets and mask, its
    channels, the offset of its first element, and its element count (forward and backward)."""
    n = tl.program_id(0)
    g = tl.program_id(1)
    c_offs = tl.arange(0, BLOCK_C)
    base = n.to(tl.int64) * stride_n + (g * cpg).to(tl.int64) * stride_c
    return n, g, tl.num_programs(1), c_offs, c_offs < cpg, g * cpg + c_offs, base, (n_hw * cpg).to(tl.float32)


@triton.jit
def _gn_silu_fwd_kernel(x_ptr, w_ptr, b_ptr, t1_ptr, t2_ptr, y_ptr, mean_ptr, rstd_ptr,
                        C, n_hw, cpg, stride_n, stride_c, stride_hw, eps,
                        MODE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                        BF16_RNE_BY_BITS: tl.constexpr):
    n, g, G, c_offs, c_mask, ch, base, count = _group(n_hw, cpg, stride_n, stride_c, BLOCK_C)
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for hw0 in range(0, n_hw, BLOCK_HW):
        _offs, _mask, x = _tile(x_ptr, base, hw0, n_hw, c_offs, cpg, stride_c, stride_hw, BLOCK_HW)
        acc += x
    mean = tl.div_rn(tl.sum(tl.sum(acc, axis=1), axis=0), count)
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for hw0 in range(0, n_hw, BLOCK_HW):
        _offs, mask, x = _tile(x_ptr, base, hw0, n_hw, c_offs, cpg, stride_c, stride_hw, BLOCK_HW)
        d = tl.where(mask, x - mean, 0.0)
        acc += d * d
    var = tl.div_rn(tl.sum(tl.sum(acc, axis=1), axis=0), count)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(mean_ptr + n * G + g, mean)
    tl.store(rstd_ptr + n * G + g, rstd)
    gamma = tl.load(w_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
    if MODE == 1:  # z + e
        beta = beta + tl.load(t1_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    if MODE == 2:  # z·(1 + s) + b
        scale = 1.0 + tl.load(t1_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
        shift = tl.load(t2_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    for hw0 in range(0, n_hw, BLOCK_HW):
        offs, mask, x = _tile(x_ptr, base, hw0, n_hw, c_offs, cpg, stride_c, stride_hw, BLOCK_HW)
        a = (x - mean) * rstd * gamma[None, :] + beta[None, :]
        if MODE == 2:
            a = a * scale[None, :] + shift[None, :]
        y = a * tl.sigmoid(a)
        tl.store(y_ptr + offs, utils.to_output_dtype(y, y_ptr, BF16_RNE_BY_BITS), mask=mask)


@triton.jit
def _silu_input_grad(x, dy, mean, rstd, gamma, beta, scale, shift):
    """One tile of the backward's recomputation: x̂, z = x̂·γ + β, and ∂L/∂a of y = SiLU(a) with
    a = z·scale + shift (both passes of the backward recompute the same values)."""
    xh = (x - mean) * rstd
    z = xh * gamma[None, :] + beta[None, :]
    a = z * scale[None, :] + shift[None, :]
    sig = tl.sigmoid(a)
    return xh, z, dy * sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _gn_silu_bwd_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, t1_ptr, t2_ptr, mean_ptr, rstd_ptr,
                        dx_ptr, dw_part_ptr, db_part_ptr, dt1_ptr, dt2_ptr,
                        C, n_hw, cpg, stride_n, stride_c, stride_hw,
                        MODE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                        BF16_RNE_BY_BITS: tl.constexpr):
    n, g, G, c_offs, c_mask, ch, base, count = _group(n_hw, cpg, stride_n, stride_c, BLOCK_C)
    mean = tl.load(mean_ptr + n * G + g)
    rstd = tl.load(rstd_ptr + n * G + g)
    gamma = tl.load(w_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
    # a = z·scale + shift covers every mode: (1, 0) none, (1, e) add, (1 + s, b) scale/shift
    scale = tl.full([BLOCK_C], 1.0, tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if MODE == 1:
        shift = tl.load(t1_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    if MODE == 2:
        scale = 1.0 + tl.load(t1_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
        shift = tl.load(t2_ptr + n * C + ch, mask=c_mask, other=0.0).to(tl.float32)
    sum_da = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)     # Σ da        (de, db)
    sum_da_z = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)   # Σ da·z      (ds)
    sum_dz_xh = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)  # Σ dz·x̂      (dγ)
    sum_dz = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)     # Σ dz        (dβ)
    for hw0 in range(0, n_hw, BLOCK_HW):
        offs, mask, x = _tile(x_ptr, base, hw0, n_hw, c_offs, cpg, stride_c, stride_hw, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xh, z, da = _silu_input_grad(x, dy, mean, rstd, gamma, beta, scale, shift)
        da = tl.where(mask, da, 0.0)
        dz = da * scale[None, :]
        if MODE == 2:
            sum_da_z += da * z
        sum_da += da
        sum_dz_xh += dz * xh
        sum_dz += dz
    dz_xh_c = tl.sum(sum_dz_xh, axis=0)  # per channel
    dz_c = tl.sum(sum_dz, axis=0)
    tl.store(dw_part_ptr + n * C + ch, dz_xh_c, mask=c_mask)
    tl.store(db_part_ptr + n * C + ch, dz_c, mask=c_mask)
    if MODE == 1:
        tl.store(dt1_ptr + n * C + ch, tl.sum(sum_da, axis=0), mask=c_mask)
    if MODE == 2:
        tl.store(dt1_ptr + n * C + ch, tl.sum(sum_da_z, axis=0), mask=c_mask)
        tl.store(dt2_ptr + n * C + ch, tl.sum(sum_da, axis=0), mask=c_mask)
    # dx̂ = dz·γ: Σ_group dx̂ = Σ_c γ_c Σ dz, Σ_group dx̂·x̂ = Σ_c γ_c Σ dz·x̂
    c1 = tl.div_rn(tl.sum(gamma * dz_c, axis=0), count)
    c2 = tl.div_rn(tl.sum(gamma * dz_xh_c, axis=0), count)
    for hw0 in range(0, n_hw, BLOCK_HW):
        offs, mask, x = _tile(x_ptr, base, hw0, n_hw, c_offs, cpg, stride_c, stride_hw, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xh, _z, da = _silu_input_grad(x, dy, mean, rstd, gamma, beta, scale, shift)
        dz = da * scale[None, :]
        dx = rstd * (dz * gamma[None, :] - c1 - xh * c2)
        tl.store(dx_ptr + offs, utils.to_output_dtype(dx, dx_ptr, BF16_RNE_BY_BITS), mask=mask)


# ----------------------------------------------------------------------------- launch

def _strides(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int, int]:
    """(positions H·W, stride of n, of c, of one position) of a dense NCHW or NHWC tensor."""
    n_hw = x[0, 0].numel()
    c = x.shape[1]
    return (n_hw, c * n_hw, 1, c) if channels_last else (n_hw, c * n_hw, n_hw, 1)


def _blocks(device: torch.device, cpg: int, n_hw: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_HW, BLOCK_C): the whole group's channels per tile, positions up to a tile budget
    (2,048 elements on a GPU: the backward keeps four fp32 accumulators per element and spilled
    at 4,096 with 4 warps in compile_check; 65,536 under the interpreter, which pays per tile step)."""
    block_c = triton.next_power_of_2(cpg)
    budget = 65536 if (interpreted or device.type != "cuda") else 2048
    block_hw = min(triton.next_power_of_2(n_hw), max(budget // block_c, 1))
    return max(block_hw, 1), block_c


def _forward(x, weight, bias, t1, t2, groups, eps, mode, channels_last):
    n, c = x.shape[:2]
    n_hw, s_n, s_c, s_hw = _strides(x, channels_last)
    cpg = c // groups
    interpreted = utils.is_interpreted(_gn_silu_fwd_kernel)
    block_hw, block_c = _blocks(x.device, cpg, n_hw, interpreted)
    y = torch.empty_like(x)  # keeps x's memory format
    stats = torch.empty(2, n, groups, dtype=torch.float32, device=x.device)
    dummy = weight
    _gn_silu_fwd_kernel[(n, groups)](
        x, weight, bias, t1 if t1 is not None else dummy, t2 if t2 is not None else dummy, y, stats[0], stats[1],
        c, n_hw, cpg, s_n, s_c, s_hw, eps,
        MODE=_MODE_ID[mode], BLOCK_HW=block_hw, BLOCK_C=block_c,
        BF16_RNE_BY_BITS=utils.bf16_rne_by_bits(y, interpreted), num_warps=4)
    return y, stats


def _backward(dy, x, weight, bias, t1, t2, stats, groups, mode, channels_last):
    n, c = x.shape[:2]
    n_hw, s_n, s_c, s_hw = _strides(x, channels_last)
    cpg = c // groups
    interpreted = utils.is_interpreted(_gn_silu_bwd_kernel)
    block_hw, block_c = _blocks(x.device, cpg, n_hw, interpreted)
    dx = torch.empty_like(x)
    parts = torch.empty(4, n, c, dtype=torch.float32, device=x.device)  # dγ, dβ, dt1, dt2 per (n, c)
    dummy = weight
    _gn_silu_bwd_kernel[(n, groups)](
        x, dy, weight, bias, t1 if t1 is not None else dummy, t2 if t2 is not None else dummy, stats[0], stats[1],
        dx, parts[0], parts[1], parts[2], parts[3],
        c, n_hw, cpg, s_n, s_c, s_hw,
        MODE=_MODE_ID[mode], BLOCK_HW=block_hw, BLOCK_C=block_c,
        BF16_RNE_BY_BITS=utils.bf16_rne_by_bits(dx, interpreted), num_warps=4)
    return dx, parts


class GroupNormSiLUFunction(torch.autograd.Function):
    """Forward: the fused kernel (saves x, mean, rstd); backward: the fused gradient kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, t1, t2, groups: int, eps: float, mode: str, channels_last: bool):
        y, stats = _forward(x, weight, bias, t1, t2, groups, eps, mode, channels_last)
        ctx.save_for_backward(x, weight, bias, t1, t2, stats)
        ctx.groups, ctx.mode, ctx.channels_last = groups, mode, channels_last
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, t1, t2, stats = ctx.saved_tensors
        dy = utils.dense(dy, ctx.channels_last)
        dx, parts = _backward(dy, x, weight, bias, t1, t2, stats, ctx.groups, ctx.mode, ctx.channels_last)
        dw = parts[0].sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = parts[1].sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        dt1 = dt2 = None
        if ctx.mode != "none" and ctx.needs_input_grad[3]:
            dt1 = parts[2].to(t1.dtype)
        if ctx.mode == "scale_shift" and ctx.needs_input_grad[4]:
            dt2 = parts[3].to(t2.dtype)
        return dx, dw, db, dt1, dt2, None, None, None, None


# ----------------------------------------------------------------------------- the wrapper

def _time_term(name: str, v, n: int, c: int, device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dtype not in checks.STORAGE_DTYPES:
        got = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else type(v).__name__
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor [N, C], got {got}")
    if v.numel() != n * c or v.shape[0] != n:
        raise ValueError(f"{name} must hold one value per (sample, channel): [N={n}, C={c}] (or [N, C, 1, 1]), "
                         f"got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but x is on {device}")
    return v.reshape(n, c).contiguous()


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, *,
                    eps: float = 1e-5, mode: str = "none", e: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(GroupNorm(x)·… ) fused; mirrors F.silu(F.group_norm(x, groups, weight, bias, eps) [+ e | ·(1+s) + b]).

    x: [N, C, *] fp32/bf16/fp16, NCHW or channels_last (anything else is copied to NCHW);
    weight, bias: [C]; mode 'add' takes e [N, C] (or [N, C, 1, 1]); 'scale_shift' takes scale and
    shift [N, C]. Differentiable in x, weight, bias and the time terms. Returns x's dtype and layout.
    """
    checks.one_of("mode", mode, MODES)
    checks.storage_tensor("x", x)
    if x.dim() < 3 or x.numel() == 0:
        raise ValueError(f"x must be [N, C, *spatial] and non-empty, got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"groups must be a positive integer dividing C={c}, got {groups!r}")
    if x.numel() // n // groups > utils.MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"a group of {x.numel() // n // groups} elements is too large for the kernels")
    eps = checks.number("eps", eps, positive=True)
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (c,) or p.dtype not in checks.STORAGE_DTYPES:
            raise ValueError(f"{name} must be a float tensor of shape [{c}], got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    utils.check_device(x.device, utils.is_interpreted(_gn_silu_fwd_kernel), weight=weight, bias=bias)
    t1 = t2 = None
    if mode == "add":
        if e is None or scale is not None or shift is not None:
            raise ValueError("mode='add' takes e (and no scale/shift)")
        t1 = _time_term("e", e, n, c, x.device)
    elif mode == "scale_shift":
        if scale is None or shift is None or e is not None:
            raise ValueError("mode='scale_shift' takes scale and shift (and no e)")
        t1, t2 = _time_term("scale", scale, n, c, x.device), _time_term("shift", shift, n, c, x.device)
    elif e is not None or scale is not None or shift is not None:
        raise ValueError("mode='none' takes no time terms")
    channels_last = utils.is_channels_last(x)  # NHWC as it is; anything else NCHW-dense
    x = utils.dense(x, channels_last)
    return GroupNormSiLUFunction.apply(x, weight.contiguous(), bias.contiguous(), t1, t2, groups, eps, mode,
                                       channels_last)


def reference(x, groups, weight, bias, *, eps=1e-5, mode="none", e=None, scale=None, shift=None):
    """The module composition the kernel replaces (pure PyTorch, x's dtype)."""
    z = torch.nn.functional.group_norm(x, groups, weight, bias, eps)
    n, c = x.shape[:2]
    expand = (n, c) + (1,) * (x.dim() - 2)
    if mode == "add":
        z = z + e.reshape(expand)
    elif mode == "scale_shift":
        z = torch.addcmul(shift.reshape(expand), z, 1 + scale.reshape(expand))
    return torch.nn.functional.silu(z)
