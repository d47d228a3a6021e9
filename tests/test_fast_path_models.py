"""DriftUNet's execution fast paths (issue 10; docs/design.md §3): model.channels_last and
model.checkpointing, each against the plain module.

channels_last (NHWC activations end to end):
- forward, input and parameter gradients within the parity rule of docs/design.md §3 against an
  fp64 copy of the plain module: |fast − ref64| ≤ 2·|plain − ref64| + floor·max|ref64| (max over
  each tensor), floor 1e-5 in fp32 and 2e-3 under bf16 autocast; attention math and sdpa, fused
  GroupNorm off and triton (interpreter), odd sizes (17×19, 20×20), widths not a multiple of 32,
  batch 1 and 3;
- the layout itself: every module's 4-D output is NHWC, and an op-level trace of forward +
  backward finds no copy of an activation (only the parameter gradients' copies into the
  parameters' layout, which the layout contract of autograd makes and which are excluded);
- settings, not architecture: net.arch unchanged, state dicts identical in layout and loadable
  across settings.
checkpointing (recompute each ResBlock in the backward):
- forward and gradients bitwise equal to the plain module with dropout on (RNG state restored),
  in fp32 and bf16, NCHW and NHWC; recomputation only when training with grad enabled;
- saved activation bytes (saved_tensors_hooks, deterministic) well below the plain module's.
Both: four AGMStep iterations from the same state give the plain loss trajectory.
"""

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agm_fast import config, models
from agm_fast.checkpoint import drift_arch, potential_arch
from agm_fast.models import DriftUNet, PotentialNet, ResBlock
from agm_fast.step import AGMStep, build_optimisers

from conftest import skip_unless_available

CL = torch.channels_last
# widths 12 and 24 (GroupNorm groups 4 and 8: not multiples of 32), 3 levels, attention at the
# inner level and in the bottleneck
TINY = {**drift_arch(config.Config()), **dict(resolution=16, channels=12, channel_mult=(1, 2, 2), num_blocks=1,
                                              attn_resolutions=(8,), num_heads=2)}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3}  # docs/design.md §3 (reductions; SDPA's bf16 floor)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run faster on one thread


def tiny_drift(seed=0, **overrides) -> DriftUNet:
    torch.manual_seed(seed)
    net = DriftUNet(**{**TINY, **overrides})
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # leave the zero-init so the output depends on the net
    torch.nn.init.normal_(net.conv_out.bias, std=0.1)
    return net


def variant(net: DriftUNet, *, channels_last=False, checkpointing=False, **arch) -> DriftUNet:
    """The same weights with other settings (and constructor arguments, e.g. the fp64 reference's)."""
    other = DriftUNet(**{**net.arch, **arch})
    other.load_state_dict(net.state_dict())
    return other.set_fast_paths(channels_last=channels_last, checkpointing=checkpointing).train(net.training)


def forward_backward(net, x, t, dtype=torch.float32, seed=1):
    """Output, input gradient and parameter gradients of sum(out · fixed weights)."""
    x = x.detach().clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = net(x, t)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in net.named_parameters()}


def assert_parity(fast, plain, ref64, dtype, what):
    """docs/design.md §3: the fast path's max error against fp64 is at most twice the same-dtype
    reference's plus the floor (relative to max|ref64|)."""
    ref64 = ref64.double()
    err_fast = (fast.double() - ref64).abs().max().item()
    err_plain = (plain.double() - ref64).abs().max().item()
    bound = 2 * err_plain + FLOOR[dtype] * ref64.abs().max().item()
    assert err_fast <= bound, f"{what}: error {err_fast:.3g} vs fp64 > {bound:.3g} (plain module's error {err_plain:.3g})"


def check_parity(net, fast, x, t, dtype):
    ref64 = variant(net, attention="math", fused_norm="off").double()
    got = forward_backward(fast, x, t, dtype)
    plain = forward_backward(net, x, t, dtype)
    ref = forward_backward(ref64, x.double(), t.double(), torch.float32)
    assert_parity(got[0], plain[0], ref[0], dtype, "output")
    assert_parity(got[1], plain[1], ref[1], dtype, "input gradient")
    for name in ref[2]:
        assert_parity(got[2][name], plain[2][name], ref[2][name], dtype, f"gradient of {name}")
    return got


def is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL)


def record_layouts(net):
    """[(module name, whether its 4-D output with more than one position is NHWC)] of every forward."""
    seen = []

    def hook(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
                seen.append((name, is_nhwc(out)))
        return fn
    for name, module in net.named_modules():
        if name:
            module.register_forward_hook(hook(name))
    return seen


# ----------------------------------------------------------------------------- channels_last: parity

@pytest.mark.parametrize("B,C,H,W,backend,dtype", [
    (1, 3, 17, 19, "math", torch.float32),
    (3, 1, 20, 20, "sdpa", torch.float32),
    (3, 3, 17, 19, "sdpa", torch.bfloat16),
    (1, 1, 20, 20, "math", torch.bfloat16),
])
def test_channels_last_matches_plain(B, C, H, W, backend, dtype):
    net = tiny_drift(in_channels=C, attention=backend).train()
    x, t = torch.randn(B, C, H, W), torch.rand(B)
    out, dx, _ = check_parity(net, variant(net, channels_last=True), x, t, dtype)
    assert is_nhwc(out) and out.dtype == (dtype if dtype == torch.bfloat16 else torch.float32)
    assert dx.shape == x.shape


def test_channels_last_non_contiguous_and_nhwc_inputs():
    net = tiny_drift(attention="sdpa").eval()
    fast = variant(net, channels_last=True).eval()
    x = torch.randn(2, 3, 19, 17).transpose(-1, -2)  # [2, 3, 17, 19], neither NCHW nor NHWC
    t = torch.rand(2)
    with torch.no_grad():
        ref = net(x.contiguous(), t)
        for inp in (x, x.contiguous(memory_format=CL)):
            torch.testing.assert_close(fast(inp, t), ref, rtol=1e-5, atol=1e-5)  # fp32 rounding, |ref| ≈ 1


def test_channels_last_with_the_fused_norm_kernel():
    """The Triton GroupNorm + SiLU kernel reads and writes NHWC (interpreter on the CPU: a
    two-level net, batch 1, to keep it to seconds)."""
    ok, why = models._triton_norm_status(torch.device("cpu"))
    skip_unless_available("triton", ok, why)
    net = tiny_drift(channel_mult=(1, 2), fused_norm="off").train()
    fast = variant(net, channels_last=True, fused_norm="triton")
    x, t = torch.randn(1, 3, 9, 11), torch.rand(1)
    seen = record_layouts(fast)
    out, _, _ = check_parity(net, fast, x, t, torch.float32)
    assert fast.norm_impl == "triton" and is_nhwc(out)
    assert not [m for m, nhwc in seen if not nhwc]


# ----------------------------------------------------------------------------- channels_last: layout

def test_channels_last_every_module_output_is_nhwc():
    net = variant(tiny_drift(attention="sdpa"), channels_last=True).train()
    seen = record_layouts(net)
    out, dx, grads = forward_backward(net, torch.randn(3, 3, 17, 19), torch.rand(3))
    assert len(seen) > 40
    assert not [m for m, nhwc in seen if not nhwc], "modules writing NCHW"
    assert is_nhwc(out) and not out.is_contiguous()
    # the parameters keep their layout: optimiser states, EMA and checkpoints are layout-free
    assert all(p.is_contiguous() and g.is_contiguous() for p, g in zip(net.parameters(), grads.values()))


COPIES = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")


class ActivationCopies(TorchDispatchMode):
    """Counts copy ops (forward and backward) whose output is not shaped like a parameter: those
    are activations. Parameter-shaped copies are autograd writing NHWC weight gradients into the
    NCHW parameters' layout (weight-sized, once per step)."""

    def __init__(self, net):
        super().__init__()
        self.param_shapes = {tuple(p.shape) for p in net.parameters()}
        self.copies = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(COPIES):
            shape = tuple((out if isinstance(out, torch.Tensor) else args[0]).shape)
            if shape not in self.param_shapes:
                self.copies[shape] += 1
        return out


def count_copies(net, x, t):
    with ActivationCopies(net) as trace:
        net(x, t).square().sum().backward()
    return trace.copies


def test_channels_last_makes_no_activation_copies():
    """SDPA attention, fused norm off, fp32, forward + backward of the parameters (x_t needs no grad
    in training). The plain module transposes around attention; the NHWC one copies nothing but,
    for an NCHW input whose size needs padding, the input conversion and the cropped output."""
    net = tiny_drift(attention="sdpa").train()
    fast = variant(net, channels_last=True)
    t = torch.rand(3)
    x = torch.randn(3, 3, 16, 16)
    assert sum(count_copies(net, x, t).values()) > 0  # the counter sees the plain module's copies
    assert count_copies(fast, x.contiguous(memory_format=CL), t) == {}
    x = torch.randn(3, 3, 17, 19)
    assert count_copies(fast, x, t) == {(3, 3, 17, 19): 2}


def test_fast_paths_are_settings_not_architecture():
    net = tiny_drift()
    arch = dict(net.arch)
    fast = variant(net, channels_last=True, checkpointing=True)
    assert fast.arch == arch and DriftUNet(**fast.arch).channels_last is False
    # a step taken NHWC + checkpointed loads into a plain net and gives the same function
    x, t = torch.randn(2, 3, 17, 19), torch.rand(2)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2)
    fast(x, t).square().mean().backward()
    opt.step()
    sd = fast.state_dict()
    assert all(v.is_contiguous() for v in sd.values())
    assert all(s.is_contiguous() for st in opt.state.values() for s in st.values() if s.dim() == 4)
    plain = variant(fast)
    back = variant(plain, channels_last=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t), fast.eval()(x, t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back.eval()(x, t), fast(x, t), rtol=0, atol=0)
    for bad in (1, "true", None):
        with pytest.raises(TypeError, match="model.channels_last must be true or false"):
            net.set_fast_paths(channels_last=bad, checkpointing=False)
        with pytest.raises(TypeError, match="model.checkpointing must be true or false"):
            net.set_fast_paths(channels_last=False, checkpointing=bad)


# ----------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, False),
                                                 (torch.float32, True)])
def test_checkpointing_is_bitwise_the_plain_module_with_dropout(dtype, channels_last):
    net = variant(tiny_drift(dropout=0.3, attention="sdpa"), channels_last=channels_last).train()
    ckpt = variant(net, channels_last=channels_last, checkpointing=True)
    x, t = torch.randn(3, 3, 17, 19), torch.rand(3)
    out, dx, grads = forward_backward(ckpt, x, t, dtype)
    ref_out, ref_dx, ref_grads = forward_backward(net, x, t, dtype)
    # dropout really acts: another mask gives another output
    assert not torch.equal(forward_backward(net, x, t, dtype, seed=2)[0], ref_out)
    assert torch.equal(out, ref_out) and torch.equal(dx, ref_dx)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def test_checkpointing_recomputes_only_when_training_with_grad(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        assert kwargs.get("use_reentrant") is False
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    net = variant(tiny_drift(), checkpointing=True)
    n_blocks = sum(isinstance(m, ResBlock) for m in net.modules())
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    net.train()(x, t)
    assert calls == ["ResBlock"] * n_blocks
    with torch.no_grad():
        net(x, t)
    net.eval()(x, t)
    assert len(calls) == n_blocks


def saved_bytes(net, x, t):
    """Bytes of the distinct activations autograd keeps for the backward (parameters excluded)."""
    params = {p.data_ptr() for p in net.parameters()}
    seen = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = net(x, t)
    out.square().sum().backward()
    return sum(seen.values())


def test_checkpointing_keeps_fewer_activations():
    net = tiny_drift(dropout=0.1).train()
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    plain = saved_bytes(net, x, t)
    ckpt = saved_bytes(variant(net, checkpointing=True), x, t)
    assert ckpt < 0.25 * plain, (ckpt, plain)


# ----------------------------------------------------------------------------- both, through AGMStep

def agm_run(channels_last, checkpointing, dropout, steps=4):
    cfg = config.load("demo32", ["train.kernels=torch", "train.precision=fp32", "train.device=cpu",
                                 "train.batch_size=4", "data.resolution=16", "model.channel_mult=[1,2]",
                                 "model.attention=sdpa", f"model.dropout={dropout}", "potential.channels=[4,4,4]",
                                 "optim.lr=1e-2", "optim.warmup_steps=0", f"model.channels_last={str(channels_last).lower()}",
                                 f"model.checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    drift = DriftUNet(**drift_arch(cfg)).set_fast_paths(channels_last=channels_last, checkpointing=checkpointing)
    potential = PotentialNet(**potential_arch(cfg))
    ema = copy.deepcopy(drift).eval().requires_grad_(False)
    opt_f, opt_v = build_optimisers(cfg, drift, potential, "for_loop")
    agm = AGMStep(cfg, drift, potential, ema, opt_f, opt_v, device=torch.device("cpu"), kernels="torch",
                  autocast_dtype=None)
    g = torch.Generator().manual_seed(1)
    B = cfg.train.batch_size
    losses = []
    for k in range(steps):
        x1 = torch.rand((B, 3, 16, 16), generator=g) * 2 - 1
        torch.manual_seed(100 + k)  # dropout
        diag = agm(torch.arange(B, dtype=torch.int64) + k * B, x1, k)
        losses.append((diag["loss_f"].item(), diag["loss_v"].item()))
    return losses


def test_training_steps_match_the_plain_module():
    """Four AGM iterations (loss_f, loss_v per step). Checkpointing redraws the same dropout masks:
    bitwise. NHWC draws dropout masks in memory order (another, equally valid draw), so its
    trajectory is compared without dropout, within fp32 rounding grown over four steps."""
    plain = agm_run(False, False, dropout=0.2)
    assert plain[-1][0] != plain[0][0]
    assert agm_run(False, True, dropout=0.2) == plain
    assert agm_run(True, True, dropout=0.2) == agm_run(True, False, dropout=0.2)
    plain = agm_run(False, False, dropout=0.0)
    for got, ref in zip(agm_run(True, False, dropout=0.0), plain):
        assert got == pytest.approx(ref, rel=1e-5)
