"""Fused GroupNorm + SiLU (+ time add or scale/shift) kernel (kernels/group_norm_silu.py) against the
module composition it replaces, and DriftUNet with model.fused_norm=triton (issue 10).

Without CUDA the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1). Parity
rule (docs/design.md §3): the kernel's max error against an fp64 reference is at most 2× the
same-dtype PyTorch reference's error plus a floor relative to the fp64 values' magnitude, 1e-6 for
the output (elementwise) and 1e-5 for the gradients (each one a reduction over a group or a batch).
"""

import copy
import importlib

import pytest
import torch

from agm_fast import checkpoint, config, dispatch, models
from agm_fast import kernels as K
from conftest import skip_unless_available

try:
    import triton
except ImportError:
    triton = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ELEMENTWISE_FLOOR = 1e-6
REDUCTION_FLOOR = 1e-5
TIME_KEYS = {"none": (), "add": ("e",), "scale_shift": ("scale", "shift")}


@pytest.fixture
def gn():
    skip_unless_available("triton", triton is not None, "triton is not installed")
    if DEVICE.type == "cpu" and not K.interpreter_active():
        pytest.skip("no CUDA and TRITON_INTERPRET was not set before triton was imported")
    return importlib.import_module("agm_fast.kernels.group_norm_silu")


def _inputs(shape, groups, mode, seed=0):
    """fp64 leaves: x, weight, bias and the mode's time terms [N, C] (scale kept small, as 1 + s)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    out = {"x": torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3,
           "weight": 1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64),
           "bias": 0.5 * torch.randn(c, generator=g, dtype=torch.float64)}
    for k in TIME_KEYS[mode]:
        out[k] = (0.3 if k == "scale" else 1.0) * torch.randn(n, c, generator=g, dtype=torch.float64)
    return out


def _run(fn, leaves, groups, mode, dy, dtype, layout, view=None):
    """(y, {name: grad}) of fn on copies of the fp64 leaves in `dtype` (x in `layout`)."""
    ins = {k: v.to(dtype).detach().requires_grad_() for k, v in leaves.items()}
    x = ins["x"]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if view is not None:
        x = view(x)
    y = fn(x, groups, ins["weight"], ins["bias"], mode=mode, **{k: ins[k] for k in TIME_KEYS[mode]})
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in ins.items()}


def _err(a, ref64):
    return (a.double() - ref64).abs().max().item()


def check_parity(gn, shape, groups, mode, dtype, layout="nchw", view=None, seed=0):
    """The kernel against F.group_norm + time + F.silu in `dtype`, both measured against fp64."""
    leaves = _inputs(shape, groups, mode, seed)
    dy = torch.randn(shape if view is None else view(torch.empty(shape)).shape,
                     generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y64, g64 = _run(gn.reference, leaves, groups, mode, dy, torch.float64, layout, view)
    y_ref, g_ref = _run(gn.reference, leaves, groups, mode, dy, dtype, layout, view)
    y, g = _run(gn.group_norm_silu, leaves, groups, mode, dy, dtype, layout, view)
    assert y.dtype == dtype and y.shape == y64.shape
    if layout == "channels_last" and view is None:
        assert y.is_contiguous(memory_format=torch.channels_last)
    report = {}
    for name, out, ref, r64, floor in [("y", y, y_ref, y64, ELEMENTWISE_FLOOR)] + [
            (f"d{k}", g[k], g_ref[k], g64[k], REDUCTION_FLOOR) for k in leaves]:
        assert out.dtype == ref.dtype and out.shape == ref.shape, name
        fast, plain = _err(out, r64), _err(ref, r64)
        bound = 2 * plain + floor * r64.abs().max().item()
        report[name] = (fast, plain)
        assert fast <= bound, f"{name}: kernel error {fast:.3g} > 2·{plain:.3g} + floor (bound {bound:.3g})"
    return report


# ----------------------------------------------------------------------------- kernel parity

@pytest.mark.parametrize("mode", ["none", "add", "scale_shift"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_parity_fp32_odd_group_size(gn, mode, layout):
    # C = 12, G = 4: 3 channels per group (not a power of 2: the channel block of 4 is masked)
    check_parity(gn, (2, 12, 5, 7), 4, mode, torch.float32, layout)


@pytest.mark.parametrize("mode,layout", [("add", "nchw"), ("scale_shift", "channels_last"), ("none", "nchw")])
def test_parity_bf16_batch_1(gn, mode, layout):
    # batch 1, C = 20, G = 4: 5 channels per group; bf16 storage, fp32 statistics
    check_parity(gn, (1, 20, 9, 3), 4, mode, torch.bfloat16, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_parity_many_tiles_with_a_tail(gn, monkeypatch, layout):
    """GPU-sized tiles: 16 positions per tile over H·W = 45 (three tiles, the last one masked), so
    the loops over tiles and the masked tail run as on a GPU."""
    monkeypatch.setattr(gn, "_blocks", lambda device, cpg, n_hw, interpreted: (16, triton.next_power_of_2(cpg)))
    check_parity(gn, (2, 6, 5, 9), 2, "scale_shift", torch.float32, layout)
    check_parity(gn, (1, 6, 9, 5), 3, "add", torch.bfloat16, layout, seed=3)


def test_parity_one_channel_groups_and_non_contiguous_input(gn):
    # C = 3 with 3 groups (norm_groups(3) = 3: one channel per group), x a strided view
    check_parity(gn, (2, 3, 6, 10), 3, "add", torch.float32, view=lambda x: x[..., ::2])
    # a transposed view: neither NCHW nor channels_last contiguous, copied by the wrapper
    check_parity(gn, (2, 8, 4, 6), 2, "none", torch.float32, view=lambda x: x.transpose(2, 3))


def test_parity_one_group_and_3d_input(gn):
    check_parity(gn, (3, 5, 11), 1, "add", torch.float32)


def test_the_bound_catches_a_biased_variance(gn):
    """The parity bound is tight enough to see a plausible bug: GroupNorm with the unbiased (n − 1)
    variance instead of the population variance fails it."""
    leaves = _inputs((2, 12, 5, 7), 4, "none")
    x = leaves["x"]

    def unbiased(x, groups, weight, bias, mode="none"):
        n, c = x.shape[:2]
        xg = x.reshape(n, groups, -1)
        xh = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, keepdim=True, unbiased=True) + 1e-5))
        return torch.nn.functional.silu(xh.reshape(x.shape) * weight[:, None, None] + bias[:, None, None])

    y64 = gn.reference(x, 4, leaves["weight"], leaves["bias"])
    ref = gn.reference(x.float(), 4, leaves["weight"].float(), leaves["bias"].float())
    bad = unbiased(x.float(), 4, leaves["weight"].float(), leaves["bias"].float())
    assert _err(bad, y64) > 2 * _err(ref, y64) + ELEMENTWISE_FLOOR * y64.abs().max().item()


def test_wrapper_checks_its_arguments(gn):
    x = torch.randn(2, 6, 4, 4)
    w, b = torch.ones(6), torch.zeros(6)
    with pytest.raises(ValueError, match="groups"):
        gn.group_norm_silu(x, 4, w, b)
    with pytest.raises(ValueError, match="mode"):
        gn.group_norm_silu(x, 3, w, b, mode="film")
    with pytest.raises(ValueError, match="takes e"):
        gn.group_norm_silu(x, 3, w, b, mode="add")
    with pytest.raises(ValueError, match="one value per"):
        gn.group_norm_silu(x, 3, w, b, mode="add", e=torch.zeros(2, 5))
    with pytest.raises(TypeError):
        gn.group_norm_silu(x.double(), 3, w, b)


# ----------------------------------------------------------------------------- the switch

def test_config_default_is_off_and_recorded_in_drift_arch():
    cfg = config.Config()
    assert cfg.model.fused_norm == "off"
    assert config.CHOICES["model.fused_norm"] == models.FUSED_NORMS
    assert checkpoint.drift_arch(cfg)["fused_norm"] == "off"


def test_older_drift_records_without_the_key_still_load():
    cfg = config.Config()
    old = {k: v for k, v in checkpoint.drift_arch(cfg).items() if k != "fused_norm"}
    checkpoint.check_arch("old", old, checkpoint.drift_arch(cfg), "drift net")  # read as fused_norm=off
    small = dict(old, resolution=8, channels=4, channel_mult=[1], attn_resolutions=[])
    assert checkpoint.build_drift_net(small).fused_norm == "off"
    with pytest.raises(checkpoint.CheckpointError, match="fused_norm"):
        checkpoint.check_arch("new", dict(old, fused_norm="triton"), checkpoint.drift_arch(cfg), "drift net")


def test_dispatch_resolves_the_switch():
    cpu = torch.device("cpu")
    assert dispatch.resolve("model.fused_norm", "off", cpu)[0] == "torch"
    assert dispatch.resolve("model.fused_norm", "auto", cpu)[0] == "torch"  # triton only chosen on CUDA
    with pytest.raises(config.ConfigError):
        dispatch.resolve("model.fused_norm", "on", cpu)
    if K.interpreter_active():
        assert dispatch.resolve("model.fused_norm", "triton", cpu)[0] == "triton"
    else:
        with pytest.raises(dispatch.UnavailableError):
            dispatch.resolve("model.fused_norm", "triton", cpu)
    assert "model.fused_norm" in dispatch.describe(cpu)


TINY = dict(in_channels=3, resolution=8, channels=3, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
            num_heads=3, dropout=0.0, attention="math", time_injection="add")  # widths 3, 6: 1–4 groups of 3 or 9 channels


def _train(net, steps, dtype, x1, t):
    """Losses of `steps` AdamW steps on a fixed regression batch (a CPU stand-in for the drift loss)."""
    net = net.to(dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    target = torch.flip(x1, dims=[-1]).to(dtype)
    losses = []
    for _ in range(steps):
        loss = ((net(x1.to(dtype), t.to(dtype)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("time_injection", ["add", "scale_shift"])
def test_drift_unet_with_the_kernel_trains_like_the_modules(gn, time_injection):
    """model.fused_norm=triton: three AdamW steps with losses matching fused_norm=off within the parity
    rule (both against the fp64 module net), the same parameters (state dicts load either way)."""
    torch.manual_seed(0)
    arch = dict(TINY, time_injection=time_injection)
    plain = models.DriftUNet(**arch, fused_norm="off")
    with torch.no_grad():  # the output conv starts at 0; give it weights so the first step's loss sees the net
        plain.conv_out.weight.normal_(0, 0.1)
    fused = models.DriftUNet(**arch, fused_norm="triton")
    fused.load_state_dict(plain.state_dict())
    ref64 = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1, 3, 6, 7, generator=g)  # batch 1, odd H, W: padded to 8
    t = torch.rand(1, generator=g)
    l64 = _train(ref64, 3, torch.float64, x1, t)
    l_plain = _train(plain, 3, torch.float32, x1, t)
    l_fused = _train(fused, 3, torch.float32, x1, t)
    assert fused.norm_impl == "triton" and plain.norm_impl == "torch"
    assert l64[2] < l64[0]  # it trains
    for step, (a, b, r) in enumerate(zip(l_fused, l_plain, l64)):
        bound = 2 * abs(b - r) + REDUCTION_FLOOR * abs(r)
        assert abs(a - r) <= bound, f"step {step}: fused {a!r}, modules {b!r}, fp64 {r!r}"
