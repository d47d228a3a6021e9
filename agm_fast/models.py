"""The two networks of AGM (docs/design.md §2): the drift U-Net f_θ(x_t, t) and the potential V_φ(x_t, t).

DriftUNet   GroupNorm + SiLU residual blocks, sinusoidal time embedding + MLP injected into every
            block (added after GroupNorm, or ADM scale-shift), stride-2 down / nearest-neighbour up
            with skip connections, self-attention at inner resolutions and in the bottleneck,
            zero-initialised output conv (the drift starts at 0). Any H, W and C: the input is
            zero-padded to a multiple of 2^(levels-1) and the output cropped back.
PotentialNet  three stride-2 Conv + GroupNorm + SiLU layers, adaptive average pool, linear → one fp32
            scalar per sample; t enters as a constant input channel or by FiLM. ≈ 1.4 % of the drift
            net's parameters (paper §3; the presets in configs/ keep it near 1.4 %).

Attention backends (`attention` ∈ ATTENTION_BACKENDS): 'xformers' (memory-efficient attention, CUDA
only, imported lazily), 'sdpa' (torch.nn.functional.scaled_dot_product_attention), 'math' (the
reference: softmax(QKᵀ/√d)V written out), 'auto' (xformers when it loads and runs on this CUDA
device, else SDPA). An explicit backend that cannot run is a ValueError, never a silent fallback.
The choice is resolved per device on the first forward (or by `net.resolve_attention_backend`),
logged once on the 'agm_fast' logger and kept in `net.attention_backend`. Resolve before
`torch.compile(fullgraph=True)`: the probe and the log line are not traceable (a graph break otherwise).

Fused GroupNorm + SiLU (`fused_norm` ∈ FUSED_NORMS, the config's model.fused_norm): 'off' runs the
modules (GroupNorm, the time term, SiLU: the reference); 'triton' runs agm_fast.kernels.group_norm_silu
for each ResBlock's norm1 + SiLU and norm2 + time + SiLU and for the output norm + SiLU (the same
parameters, so a state dict loads either way); 'auto' is triton on a CUDA device where the kernels run
natively, the modules elsewhere. Resolved per device on the first forward (`resolve_fused_norm`, which
agm_fast.dispatch also answers for `agm-fast info`), logged once, kept in `net.norm_impl`.

Memory layout and recomputation (`net.set_fast_paths(channels_last=, checkpointing=)`, the config's
model.channels_last and model.checkpointing; docs/design.md §3): execution settings of a built net,
not architecture. They are kept out of `net.arch` and change no parameter, so a checkpoint written
with any setting loads and resumes with any other. channels_last converts the input to NHWC once;
convs, GroupNorm (modules or kernel), the time terms, dropout, concatenation, up/down-sampling and
the zero pad keep NHWC, attention reads its tokens as views of the NHWC memory, and the output is
NHWC. The parameters stay in their default layout (the convolutions take NHWC from the input), so
gradients, optimiser states, EMA and checkpoint tensors are the same either way (NHWC parameters
with an optimiser state resumed from NCHW tensors make torch's fused AdamW step wrongly, silently,
on the CPU; the cost here is a weight-sized copy of each weight gradient). checkpointing
recomputes each ResBlock (with its attention) in the backward when training with grad enabled
(torch.utils.checkpoint, non-reentrant, RNG state restored: dropout draws the same mask twice).

Every network keeps its constructor arguments in `net.arch` (plain JSON values), so a checkpoint
rebuilds it with `type(net)(**net.arch)`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import checks

logger = logging.getLogger("agm_fast")

ATTENTION_BACKENDS = checks.ATTENTION
FUSED_NORMS = checks.FUSED_NORMS  # model.fused_norm: the modules | the Triton kernel | triton on CUDA
TIME_SCALE = 1000.0  # t ∈ [0, 1] is scaled before the sinusoids so low frequencies still vary over [0, 1]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters())


def norm_groups(channels: int) -> int:
    """GroupNorm groups: 32 when it divides `channels`, else the largest common divisor (always divides)."""
    return math.gcd(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (fp32) of t·TIME_SCALE, periods from 2π up to 2π·10⁴ (DDPM/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))  # odd dim: one zero column


def _check_t(t, x: torch.Tensor) -> torch.Tensor:
    """t as a float tensor [B] on x's device: accepts [B], [B, 1], a 0-dim tensor or a Python number."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor of shape [{B}] (times in [0, 1]); got dtype {t.dtype}")
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(1).expand(B)
    if t.numel() != B:
        raise ValueError(f"t must have shape [{B}] (one time per sample) or be a scalar; got {tuple(t.shape)}")
    return t.reshape(B)


def _check_x(x: torch.Tensor, in_channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [B, {in_channels}, H, W] (in_channels={in_channels}); got {shape}")


# ----------------------------------------------------------------------------- attention backends

_XFORMERS_STATUS: dict[str, tuple[bool, str]] = {}  # device → (works, why); probed once per device
_LOGGED: set[tuple[str, str, str]] = set()


def _xformers_ops():
    import xformers.ops  # lazy: optional dependency, and importing it initialises CUDA state

    return xformers.ops


def _xformers_importable() -> tuple[bool, str]:
    if "import" not in _XFORMERS_STATUS:
        try:
            _xformers_ops()
            _XFORMERS_STATUS["import"] = (True, "xformers.ops imports")
        except Exception as e:  # ImportError, or a broken build raising anything at import
            _XFORMERS_STATUS["import"] = (False, f"xformers.ops does not import ({type(e).__name__}: {e})")
    return _XFORMERS_STATUS["import"]


def _xformers_works(device: torch.device) -> tuple[bool, str]:
    """Import xformers.ops and run one tiny memory-efficient attention on `device` (a CUDA build
    for another torch/CUDA imports fine and fails only when an op is called)."""
    if device.type != "cuda":
        return False, f"xformers' memory-efficient attention needs a CUDA device; got {device.type}"
    key = str(device)
    if key not in _XFORMERS_STATUS:
        ok, why = _xformers_importable()
        if ok:
            try:  # forward and backward in each dtype training may use ([B, N, heads, d] layout)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    q = torch.randn(1, 16, 1, 32, device=device, dtype=dtype, requires_grad=True)
                    _xformers_ops().memory_efficient_attention(q, q, q).sum().backward()
                torch.cuda.synchronize(device)
                why = f"xformers memory-efficient attention runs on {device}"
            except Exception as e:
                ok, why = False, f"xformers.ops imports but its attention fails on {device} ({type(e).__name__}: {e})"
        _XFORMERS_STATUS[key] = (ok, why)
    return _XFORMERS_STATUS[key]


def resolve_attention(requested: str, device) -> tuple[str, str]:
    """(backend actually used, reason) for `model.attention=requested` on `device`.

    auto → 'xformers' when on CUDA and xformers.ops imports and runs, else 'sdpa'. An explicit
    backend that cannot run raises ValueError (no silent fallback)."""
    checks.one_of("attention", requested, ATTENTION_BACKENDS)
    device = torch.device(device)
    allowed = ", ".join(repr(a) for a in ATTENTION_BACKENDS)
    if requested == "math":
        return "math", "requested explicitly (reference softmax(QKᵀ/√d)V)"
    if requested == "sdpa":
        return "sdpa", "requested explicitly"
    ok, why = _xformers_works(device)
    if requested == "xformers":
        if not ok:
            raise ValueError(f"model.attention='xformers' is unavailable: {why}. Allowed: {allowed} "
                             "('auto' uses xformers where it runs and SDPA elsewhere)")
        return "xformers", why
    return ("xformers", why) if ok else ("sdpa", f"auto: {why}; using PyTorch SDPA")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Multi-head self-attention on [B, heads, N, d] tensors with the resolved backend → [B, heads, N, d]."""
    if backend == "math":
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, N, N]
        return scores.softmax(dim=-1) @ v
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":  # xformers takes [B, N, heads, d]
        q, k, v = (a.transpose(1, 2).contiguous() for a in (q, k, v))
        return _xformers_ops().memory_efficient_attention(q, k, v).transpose(1, 2)
    raise ValueError(f"attention backend must be one of 'math', 'sdpa', 'xformers' (resolved); got {backend!r}")


# ----------------------------------------------------------------------------- fused GroupNorm + SiLU

def _triton_norm_status(device: torch.device) -> tuple[bool, str]:
    """Whether agm_fast.kernels.group_norm_silu runs on `device` (natively on CUDA, or in the interpreter)."""
    try:
        from agm_fast import kernels
    except Exception as e:  # an import error of triton itself must not break the models
        return False, f"agm_fast.kernels failed to import: {e}"
    if device.type != "cuda":
        if kernels.interpreter_active():
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "Triton needs a CUDA device (or TRITON_INTERPRET=1 for tests on CPU)"
    return kernels.available()


def resolve_fused_norm(requested: str, device) -> tuple[str, str]:
    """('torch' | 'triton', reason) for `model.fused_norm=requested` on `device`.

    off → the modules; triton → the kernel, a ValueError when it cannot run here (no silent
    fallback); auto → the kernel on a CUDA device where Triton runs natively, else the modules."""
    checks.one_of("fused_norm", requested, FUSED_NORMS)
    device = torch.device(device)
    if requested == "off":
        return "torch", "GroupNorm + SiLU modules (model.fused_norm=off, the reference)"
    ok, why = _triton_norm_status(device)
    if requested == "triton":
        if not ok:
            raise ValueError(f"model.fused_norm='triton' cannot run on {device}: {why}")
        return "triton", why
    if ok and device.type == "cuda":
        return "triton", why
    return "torch", f"auto: {why}" if not ok else f"auto: the modules on {device.type} (triton only chosen on CUDA)"


def _is_nhwc(x: torch.Tensor) -> bool:
    """Whether x's memory is NHWC (channels_last and not also NCHW-contiguous, as 1×1 maps are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) in x's memory layout. CUDA's GroupNorm writes NCHW even for NHWC input: one copy back
    there (model.fused_norm=triton avoids it in the ResBlocks); a no-op where NHWC is kept (CPU)."""
    y = norm(x)
    return y.contiguous(memory_format=torch.channels_last) if _is_nhwc(x) else y


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, impl: str, *, e=None, scale=None, shift=None) -> torch.Tensor:
    """SiLU(norm(x) [+ e | ·(1 + scale) + shift]) with e, scale, shift [B, C, 1, 1]: the modules, or the kernel."""
    if impl == "triton":
        from agm_fast import kernels
        mode = "add" if e is not None else "scale_shift" if scale is not None else "none"
        return kernels.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, mode=mode,
                                       e=e, scale=scale, shift=shift)
    h = group_norm(norm, x)
    if e is not None:  # add after the norm: DDPM adds before it, which GroupNorm cancels when a group is one channel
        h = h + e
    elif scale is not None:  # ADM: norm(h)·(1 + scale) + shift
        h = torch.addcmul(shift, h, 1 + scale)
    return F.silu(h)


# ----------------------------------------------------------------------------- drift U-Net

class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        qkv = self.qkv(group_norm(self.norm, x))
        if _is_nhwc(qkv):  # memory [B, H, W, 3C]: the tokens are a view, no NCHW transpose; unbinding
            # dim 2 makes the backward's stack of dq, dk, dv write that same memory order (no copy)
            q, k, v = (a.transpose(1, 2) for a in qkv.permute(0, 2, 3, 1).reshape(B, H * W, 3, heads, d).unbind(2))
            out = attention(q, k, v, backend).transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:  # memory [B, 3C, H, W]
            q, k, v = qkv.reshape(B, 3, heads, d, H * W).transpose(-2, -1).unbind(1)  # each [B, heads, N, d]
            out = attention(q, k, v, backend).transpose(-2, -1).reshape(B, C, H, W)
        return x + self.proj(out)


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN, then time (add, or scale-shift) → SiLU → dropout → conv3×3, residual;
    then self-attention when `attend` is set (EDM2-style block)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float, time_injection: str,
                 attend: bool, num_heads: int):
        super().__init__()
        self.scale_shift = time_injection == "scale_shift"
        self.norm1 = nn.GroupNorm(norm_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if self.scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(norm_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = SelfAttention(out_ch, num_heads) if attend else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, backend: str, norm_impl: str = "torch") -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x, norm_impl))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:  # ADM: norm(h)·(1 + scale) + shift
            scale, shift = e.chunk(2, dim=1)
            h = norm_silu(self.norm2, h, norm_impl, scale=scale, shift=shift)
        else:  # add after the norm
            h = norm_silu(self.norm2, h, norm_impl, e=e)
        h = self.conv2(self.dropout(h))
        x = self.skip(x) + h
        return self.attn(x, backend) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DriftUNet(nn.Module):
    """f_θ(x_t, t) → drift (or x̂1), same shape as x_t. forward(x [B,C,H,W], t [B] float in [0, 1])."""

    def __init__(
        self, *,
        in_channels: int,                # image channels C (1 = grey)
        resolution: int,                 # nominal input size; level ℓ works at resolution // 2^ℓ
        channels: int,                   # base width (≥ 2); level ℓ has channels · channel_mult[ℓ]
        channel_mult,                    # one entry per level; len-1 downsamplings
        num_blocks: int,                 # residual blocks per level in the encoder (decoder: +1)
        attn_resolutions,                # self-attention at levels whose resolution // 2^ℓ is listed
        num_heads: int,                  # attention heads (must divide each attended width)
        dropout: float,                  # dropout inside residual blocks
        attention: str,                  # 'auto' | 'xformers' | 'sdpa' | 'math'
        time_injection: str,             # 'add': GN(h) + e(t) | 'scale_shift' (ADM): GN(h)·(1 + s(t)) + b(t)
        fused_norm: str,                 # 'off' | 'triton' | 'auto': fused GroupNorm + SiLU (+ time) kernel
                                         # (records written before it existed: checkpoint.DRIFT_ARCH_DEFAULTS)
    ):
        # The arguments are the config's model.* fields (checked there: agm_fast.config); the
        # defaults live only in the config. Checked here: what the config cannot know.
        super().__init__()
        checks.one_of("attention", attention, ATTENTION_BACKENDS)
        checks.one_of("time_injection", time_injection, checks.TIME_INJECTIONS)
        checks.one_of("fused_norm", fused_norm, FUSED_NORMS)
        channel_mult, attn_resolutions = tuple(int(m) for m in channel_mult), tuple(int(r) for r in attn_resolutions)
        if attention == "xformers":  # fail at build time when it cannot even import; CUDA is checked per device
            ok, why = _xformers_importable()
            if not ok:
                raise ValueError(f"model.attention='xformers' is unavailable: {why}. "
                                 f"Allowed: {', '.join(repr(a) for a in ATTENTION_BACKENDS)}")
        self.arch = dict(in_channels=in_channels, resolution=resolution, channels=channels,
                         channel_mult=list(channel_mult), num_blocks=num_blocks,
                         attn_resolutions=list(attn_resolutions), num_heads=num_heads, dropout=float(dropout),
                         attention=attention, time_injection=time_injection, fused_norm=fused_norm)
        self.in_channels, self.resolution, self.attention = in_channels, resolution, attention
        self.fused_norm = fused_norm
        self.norm_impl: str | None = None  # resolved on the first forward / resolve_norm_impl
        self.norm_reason: str | None = None
        self._norm_device: str | None = None
        self.pad_multiple = 2 ** (len(channel_mult) - 1)
        self.channels_last = False  # execution settings (set_fast_paths), not in arch
        self.checkpointing = False
        self.attention_backend: str | None = None  # resolved on the first forward / resolve_attention_backend
        self.attention_reason: str | None = None
        self._attention_device: str | None = None

        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        block = lambda cin, cout, attn: ResBlock(cin, cout, emb_dim, dropout=dropout, time_injection=time_injection,
                                                 attend=attn, num_heads=num_heads)
        widths = [channels * m for m in channel_mult]
        attended = [resolution // 2 ** lvl in attn_resolutions for lvl in range(len(widths))] + [True]
        for w, attn in zip(widths + [widths[-1]], attended):
            if attn and w % num_heads:
                raise ValueError(f"model.num_heads={num_heads} must divide every attended width; got width {w}")

        # encoder: every module's output is kept as a skip for the decoder
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc = nn.ModuleDict()
        skips, ch = [channels], channels
        for lvl, w in enumerate(widths):
            for i in range(num_blocks):
                self.enc[f"level{lvl}_block{i}"] = block(ch, w, attended[lvl])
                ch = w
                skips.append(ch)
            if lvl != len(widths) - 1:
                self.enc[f"level{lvl}_down"] = Downsample(ch)
                skips.append(ch)

        # bottleneck: always attends (as DDPM/ADM), at the lowest resolution
        self.mid = nn.ModuleList([block(ch, ch, True), block(ch, ch, False)])

        # decoder: num_blocks + 1 blocks per level, each eating one skip
        self.dec = nn.ModuleDict()
        for lvl in reversed(range(len(widths))):
            for i in range(num_blocks + 1):
                self.dec[f"level{lvl}_block{i}"] = block(ch + skips.pop(), widths[lvl], attended[lvl])
                ch = widths[lvl]
            if lvl != 0:
                self.dec[f"level{lvl}_up"] = Upsample(ch)

        self.norm_out = nn.GroupNorm(norm_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the drift starts at exactly 0
        nn.init.zeros_(self.conv_out.bias)

    def set_fast_paths(self, *, channels_last: bool, checkpointing: bool) -> "DriftUNet":
        """model.channels_last (NHWC activations) and model.checkpointing (recompute each ResBlock in
        the backward); returns the net. Neither touches the parameters (see the module docstring)."""
        for name, value in (("channels_last", channels_last), ("checkpointing", checkpointing)):
            if not isinstance(value, bool):
                raise TypeError(f"model.{name} must be true or false; got {value!r}")
        self.channels_last, self.checkpointing = channels_last, checkpointing
        return self

    def resolve_attention_backend(self, device) -> str:
        """Resolve model.attention for `device` (again only when the device changes), log it, return the backend."""
        device = torch.device(device)
        if self._attention_device != str(device):
            self.attention_backend, self.attention_reason = resolve_attention(self.attention, device)
            self._attention_device = str(device)
            key = (self.attention, self.attention_backend, str(device))
            if key not in _LOGGED:
                _LOGGED.add(key)
                logger.info("DriftUNet attention: model.attention=%r → %s on %s (%s)", self.attention,
                            self.attention_backend, device, self.attention_reason)
        return self.attention_backend

    def resolve_norm_impl(self, device) -> str:
        """Resolve model.fused_norm for `device` (again only when the device changes), log it, return 'torch' | 'triton'."""
        device = torch.device(device)
        if self._norm_device != str(device):
            self.norm_impl, self.norm_reason = resolve_fused_norm(self.fused_norm, device)
            self._norm_device = str(device)
            key = ("fused_norm", self.fused_norm, self.norm_impl, str(device))
            if key not in _LOGGED:
                _LOGGED.add(key)
                logger.info("DriftUNet GroupNorm + SiLU: model.fused_norm=%r → %s on %s (%s)", self.fused_norm,
                            self.norm_impl, device, self.norm_reason)
        return self.norm_impl

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        _check_x(x, self.in_channels)
        t = _check_t(t, x)
        backend = self.resolve_attention_backend(x.device)
        norm_impl = self.resolve_norm_impl(x.device)
        if self.channels_last:  # the one layout conversion: every op below keeps NHWC
            x = x.contiguous(memory_format=torch.channels_last)

        # pad H, W to a multiple of 2^(levels-1) (zeros, centred) so every downsampling is exact
        H, W = x.shape[-2:]
        ph, pw = -H % self.pad_multiple, -W % self.pad_multiple
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

        first = self.time_mlp[0]  # the sinusoids are computed in fp32; match the weights (bf16 nets)
        emb = self.time_mlp(timestep_embedding(t, first.in_features).to(first.weight.dtype))
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()

        def block(module: ResBlock, h: torch.Tensor) -> torch.Tensor:
            if recompute:  # keep only the block's input; dropout's mask is redrawn from the saved RNG state
                return torch.utils.checkpoint.checkpoint(module, h, emb, backend, norm_impl, use_reentrant=False)
            return module(h, emb, backend, norm_impl)

        h = self.conv_in(x)
        skips = [h]
        for module in self.enc.values():
            h = block(module, h) if isinstance(module, ResBlock) else module(h)
            skips.append(h)
        for module in self.mid:
            h = block(module, h)
        for module in self.dec.values():
            h = block(module, torch.cat([h, skips.pop()], dim=1)) if isinstance(module, ResBlock) else module(h)
        out = self.conv_out(norm_silu(self.norm_out, h, norm_impl))
        out = out[..., ph // 2: ph // 2 + H, pw // 2: pw // 2 + W]
        # a cropped NHWC view is not channels_last-contiguous; C channels only, so one small copy
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


# ----------------------------------------------------------------------------- potential

class PotentialNet(nn.Module):
    """V_φ(x_t, t) → [B] fp32 (paper Fig. 1: three stride-2 Conv+GN layers, AvgPool, linear)."""

    def __init__(
        self, *,
        in_channels: int,                # image channels C
        resolution: int,                 # nominal input size (metadata; any H, W works)
        channels,                        # width of each stride-2 Conv + GroupNorm + SiLU layer
        time_input: str,                 # 'channel': t as a constant extra input channel; 'film': FiLM
        film_dim: int,                   # sinusoidal embedding width feeding FiLM ('film' only)
    ):
        # the config's potential.* fields (checked there); the defaults live only in the config
        super().__init__()
        checks.one_of("time_input", time_input, checks.TIME_INPUTS)
        channels = tuple(int(c) for c in channels)
        self.arch = dict(in_channels=in_channels, resolution=resolution, channels=list(channels),
                         time_input=time_input, film_dim=film_dim)
        self.in_channels, self.time_input, self.film_dim = in_channels, time_input, film_dim

        cin = in_channels + (time_input == "channel")
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        self.films = nn.ModuleList() if time_input == "film" else None
        for c in channels:
            self.convs.append(nn.Conv2d(cin, c, 3, stride=2, padding=1))
            self.norms.append(nn.GroupNorm(norm_groups(c), c))
            if self.films is not None:
                self.films.append(nn.Linear(film_dim, 2 * c))
            cin = c
        self.head = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        _check_x(x, self.in_channels)
        t = _check_t(t, x)
        B, _, H, W = x.shape
        if self.time_input == "channel":
            x = torch.cat([x, t.to(x.dtype)[:, None, None, None].expand(B, 1, H, W)], dim=1)
        else:
            emb = timestep_embedding(t, self.film_dim)
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if self.films is not None:  # FiLM: norm(h)·(1 + γ(t)) + β(t)
                film = self.films[i]
                gamma, beta = film(emb.to(film.weight.dtype))[:, :, None, None].chunk(2, dim=1)
                h = torch.addcmul(beta.to(h.dtype), h, (1 + gamma).to(h.dtype))
            h = F.silu(h)
        h = h.mean(dim=(2, 3))  # adaptive average pool to 1×1
        with torch.autocast(device_type=x.device.type, enabled=False):  # the scalar is fp32 under any autocast
            return F.linear(h.float(), self.head.weight.float(), self.head.bias.float()).squeeze(1)
