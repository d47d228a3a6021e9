"""DriftUNet / PotentialNet / attention backends / presets (agm_fast.models, docs/design.md §2)."""

import json
import logging

import pytest
import torch

from agm_fast import models
from agm_fast import config
from agm_fast.models import (ATTENTION_BACKENDS, DriftUNet, PotentialNet, attention, count_parameters, norm_groups,
                             resolve_attention)
from agm_fast.checkpoint import drift_arch, potential_arch

# The nets take every argument explicitly (the defaults live only in the config): start from the
# config's records and shrink. A small net that still has every part: 3 levels, attention at one
# inner level + the bottleneck.
TINY = {**drift_arch(config.Config()), **dict(resolution=16, channels=8, channel_mult=(1, 2, 2), num_blocks=1,
                                              attn_resolutions=(8,), num_heads=2)}
POTENTIAL = potential_arch(config.Config())


def tiny_drift(seed=0, **overrides):
    torch.manual_seed(seed)
    net = DriftUNet(**{**TINY, **overrides})
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # leave the zero-init so the output depends on the net
    torch.nn.init.normal_(net.conv_out.bias, std=0.1)
    return net


# ----------------------------------------------------------------------------- DriftUNet

@pytest.mark.parametrize("B,C,H,W", [(2, 1, 28, 28), (1, 3, 7, 7), (2, 3, 30, 30), (1, 1, 13, 21), (1, 3, 16, 16),
                                     (3, 3, 1, 5)])
def test_drift_shapes_any_size(B, C, H, W):
    net = tiny_drift(in_channels=C)
    x, t = torch.randn(B, C, H, W), torch.rand(B)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # the crop takes back exactly the padded input's own pixels: same as padding by hand (centred zeros)
    m = net.pad_multiple
    ph, pw = -H % m, -W % m
    padded = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    by_hand = net(padded, t)[..., ph // 2: ph // 2 + H, pw // 2: pw // 2 + W]
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-6)
    if ph // 2 or pw // 2:  # a crop from the corner would be a different image
        assert not torch.allclose(out, net(padded, t)[..., :H, :W])


def test_drift_non_contiguous_input_matches_contiguous():
    net = tiny_drift(in_channels=3).eval()
    base = torch.randn(2, 3, 19, 23)
    x = base.transpose(-1, -2)  # [2, 3, 23, 19], non-contiguous
    assert not x.is_contiguous()
    t = torch.rand(4)[::2]      # non-contiguous t
    torch.testing.assert_close(net(x, t), net(x.contiguous(), t.contiguous()), rtol=1e-5, atol=1e-6)


def test_drift_zero_initialised_output_then_one_sgd_step_moves_it():
    torch.manual_seed(0)
    net = DriftUNet(**TINY)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.equal(net(x, t), torch.zeros_like(x))
    target = torch.randn_like(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(net(x, t), target).backward()
    opt.step()
    assert net(x, t).abs().max() > 1e-4


@pytest.mark.parametrize("time_injection", ["add", "scale_shift"])
def test_drift_gradients_reach_every_parameter(time_injection):
    net = tiny_drift(time_injection=time_injection)
    x, t = torch.randn(2, 3, 15, 15), torch.rand(2)
    net(x, t).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("time_injection", ["add", "scale_shift"])
def test_drift_depends_on_t(time_injection):
    net = tiny_drift(time_injection=time_injection)  # width 8: one channel per GroupNorm group
    x = torch.randn(2, 3, 16, 16)
    assert (net(x, torch.full((2,), 0.1)) - net(x, torch.full((2,), 0.9))).abs().max() > 1e-4


def test_drift_scalar_t_broadcasts():
    net = tiny_drift()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(net(x, 0.3), net(x, torch.full((3,), 0.3)))


def test_drift_bf16_autocast_runs_and_stays_close():
    net = tiny_drift()
    x, t = torch.randn(2, 3, 12, 12), torch.rand(2)
    ref = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.shape == x.shape
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02
    out = net.bfloat16()(x.bfloat16(), t)  # bf16 weights: the fp32 time embedding is cast to match
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_drift_bad_inputs_are_clear_errors():
    net = tiny_drift()
    with pytest.raises(ValueError, match=r"x must be a tensor \[B, 3, H, W\]"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(3, 16, 16), torch.rand(3))
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        net(torch.randn(2, 3, 16, 16), torch.rand(3))
    with pytest.raises(TypeError, match="t must be a floating-point"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="model.num_heads"):
        DriftUNet(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="time_injection must be 'add' or 'scale_shift', got 'concat'"):
        DriftUNet(**{**TINY, "time_injection": "concat"})


def test_attention_is_placed_by_level_resolution():
    def attended_levels(net, part):
        return sorted({int(name.split("_")[0][5:]) for name, m in getattr(net, part).items()
                       if isinstance(m, models.ResBlock) and m.attn is not None})
    with torch.device("meta"):
        net = DriftUNet(**{**TINY, **dict(resolution=32, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,))})
    assert attended_levels(net, "enc") == [1] and attended_levels(net, "dec") == [1]
    assert net.mid[0].attn is not None and net.mid[1].attn is None  # the bottleneck always attends
    with torch.device("meta"):
        net = DriftUNet(**{**TINY, **dict(resolution=64, channel_mult=(1, 2, 2, 2), attn_resolutions=(16, 8))})
    assert attended_levels(net, "enc") == [2, 3] and attended_levels(net, "dec") == [2, 3]


def test_norm_groups_always_divide():
    for c in [1, 2, 3, 8, 24, 48, 96, 100, 128, 160, 288, 576]:
        g = norm_groups(c)
        assert c % g == 0 and g <= 32
    assert norm_groups(128) == 32 and norm_groups(48) == 16
    DriftUNet(**{**TINY, "channels": 12, "num_heads": 4})(torch.randn(1, 3, 8, 8), torch.rand(1))  # 12 → 4 groups


@pytest.mark.parametrize("cls,kwargs", [(DriftUNet, TINY),
                                        (DriftUNet, {**TINY, "time_injection": "scale_shift", "dropout": 0.1}),
                                        (PotentialNet, {**POTENTIAL, **dict(channels=(8, 16, 24), time_input="film")})])
def test_arch_rebuilds_the_same_network(cls, kwargs):
    net = cls(**kwargs)
    arch = json.loads(json.dumps(net.arch))  # a checkpoint stores it as JSON
    rebuilt = cls(**arch)
    assert rebuilt.arch == net.arch
    assert {n: p.shape for n, p in net.named_parameters()} == {n: p.shape for n, p in rebuilt.named_parameters()}
    rebuilt.load_state_dict(net.state_dict())  # strict: same keys


def test_drift_traces_as_one_graph_once_attention_is_resolved():
    net = tiny_drift()
    x, t = torch.randn(2, 3, 13, 13), torch.rand(2)
    net.resolve_attention_backend(x.device)  # the trainer does this after .to(device), before compiling
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # fullgraph: any graph break is an error
    torch.testing.assert_close(compiled(x, t), net(x, t))


# ----------------------------------------------------------------------------- attention backends

def test_math_and_sdpa_networks_agree_forward_and_backward():
    nets = {}
    for backend in ("math", "sdpa"):
        nets[backend] = tiny_drift(seed=1, attention=backend)  # same seed → same weights
    x, t = torch.randn(2, 3, 11, 13), torch.rand(2)
    outs, grads = {}, {}
    for backend, net in nets.items():
        xb = x.clone().requires_grad_()
        out = net(xb, t)
        out.square().mean().backward()
        outs[backend], grads[backend] = out, {"x": xb.grad, **{n: p.grad for n, p in net.named_parameters()}}
        assert net.attention_backend == backend
    torch.testing.assert_close(outs["sdpa"], outs["math"], rtol=1e-5, atol=1e-6)
    for name in grads["math"]:
        torch.testing.assert_close(grads["sdpa"][name], grads["math"][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-6), (torch.bfloat16, 2e-3)])
@pytest.mark.parametrize("shape", [(1, 1, 7, 5), (2, 3, 49, 16)])
def test_sdpa_meets_parity_rule_against_fp64_math(dtype, floor, shape):
    """DESIGN §3: err(sdpa in dtype vs fp64) ≤ 2·err(math in dtype vs fp64) + floor, forward and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(shape, dtype=torch.float64)

    def run(backend, dt):
        qkv = [a.detach().to(dt).clone().requires_grad_() for a in (q, k, v)]
        out = attention(*qkv, backend)
        out.backward(grad_out.to(dt))
        return [out] + [a.grad for a in qkv]

    ref = run("math", torch.float64)
    math_res, sdpa_res = run("math", dtype), run("sdpa", dtype)
    for name, r, m, s in zip(["out", "dq", "dk", "dv"], ref, math_res, sdpa_res):
        err_math = (m.double() - r).abs().max().item()
        err_sdpa = (s.double() - r).abs().max().item()
        assert err_sdpa <= 2 * err_math + floor, f"{name}: sdpa {err_sdpa:.3g} vs math {err_math:.3g}"


def test_auto_on_cpu_resolves_to_sdpa_and_logs_once(monkeypatch, caplog):
    backend, reason = resolve_attention("auto", "cpu")
    assert backend == "sdpa" and "CUDA" in reason
    monkeypatch.setattr(models, "_LOGGED", set())
    net = tiny_drift()
    assert net.attention_backend is None  # resolved on first use, for the input's device
    with caplog.at_level(logging.INFO, logger="agm_fast"):
        net(torch.randn(1, 3, 8, 8), torch.rand(1))
        net(torch.randn(1, 3, 8, 8), torch.rand(1))
        tiny_drift()(torch.randn(1, 3, 8, 8), torch.rand(1))
    records = [r for r in caplog.records if r.name == "agm_fast" and "attention" in r.getMessage()]
    assert len(records) == 1 and "sdpa" in records[0].getMessage()
    assert net.attention_backend == "sdpa"


@pytest.mark.parametrize("requested", ["math", "sdpa"])
def test_explicit_backends_resolve_to_themselves(requested):
    assert resolve_attention(requested, "cpu")[0] == requested


def test_explicit_xformers_without_it_is_a_value_error():
    allowed = ["'auto'", "'xformers'", "'sdpa'", "'math'"]
    # on a CPU device xformers can never run, installed or not
    with pytest.raises(ValueError, match="model.attention='xformers'") as info:
        resolve_attention("xformers", "cpu")
    assert all(a in str(info.value) for a in allowed)
    if models._xformers_importable()[0]:
        pytest.skip("xformers is installed: the build-time 'not importable' error cannot be exercised")
    with pytest.raises(ValueError, match="model.attention='xformers' is unavailable") as info:
        DriftUNet(**{**TINY, "attention": "xformers"})
    assert all(a in str(info.value) for a in allowed)


def test_xformers_layout_and_auto_choice_with_a_stand_in(monkeypatch):
    """No xformers here: a stand-in with xformers' [B, N, heads, d] convention checks our transposes and
    the auto / explicit choice logic given a working or a broken xformers on a CUDA device."""
    class FakeOps:
        @staticmethod
        def memory_efficient_attention(q, k, v):
            assert q.dim() == 4 and q.is_contiguous()
            to_bhnd = lambda a: a.transpose(1, 2)
            return attention(to_bhnd(q), to_bhnd(k), to_bhnd(v), "math").transpose(1, 2)

    monkeypatch.setattr(models, "_xformers_ops", lambda: FakeOps)
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "xformers"), attention(q, k, v, "math"))

    monkeypatch.setattr(models, "_XFORMERS_STATUS", {"cuda": (True, "probe ran")})
    assert resolve_attention("auto", "cuda") == ("xformers", "probe ran")
    assert resolve_attention("xformers", "cuda")[0] == "xformers"
    assert resolve_attention("sdpa", "cuda")[0] == "sdpa"  # explicit wins over a working xformers
    monkeypatch.setattr(models, "_XFORMERS_STATUS", {"cuda": (False, "its attention fails on cuda")})
    backend, reason = resolve_attention("auto", "cuda")
    assert backend == "sdpa" and "its attention fails" in reason
    with pytest.raises(ValueError, match="model.attention='xformers' is unavailable: its attention fails"):
        resolve_attention("xformers", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_backend_matches_math_under_bf16_autocast():
    backend, reason = resolve_attention("auto", "cuda")
    assert backend in ("xformers", "sdpa") and reason
    outs, x, t = {}, torch.randn(2, 3, 21, 17, device="cuda"), torch.rand(2, device="cuda")
    for name in ("auto", "math"):
        net = tiny_drift(seed=3, attention=name).cuda()  # same seed → same weights
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[name] = net(x, t).float()
        assert net.attention_backend == (backend if name == "auto" else "math")
    assert (outs["auto"] - outs["math"]).abs().max() < 0.05 * outs["math"].abs().max() + 0.02


@pytest.mark.parametrize("bad", ["flash", "SDPA", "", None, 3])
def test_unknown_attention_name_is_a_value_error(bad):
    with pytest.raises(ValueError, match="attention must be 'auto', 'xformers', 'sdpa' or 'math', got"):
        resolve_attention(bad, "cpu")
    with pytest.raises(ValueError, match="attention must be"):
        DriftUNet(**{**TINY, "attention": bad})
    with pytest.raises(ValueError, match="attention backend must be one of"):
        attention(*(torch.randn(1, 1, 2, 2),) * 3, "auto")  # only a resolved backend is accepted here
    assert set(ATTENTION_BACKENDS) == {"auto", "xformers", "sdpa", "math"}


# ----------------------------------------------------------------------------- PotentialNet

@pytest.mark.parametrize("time_input", ["channel", "film"])
@pytest.mark.parametrize("B,C,H,W", [(1, 1, 28, 28), (3, 3, 7, 9), (2, 3, 32, 32)])
def test_potential_is_fp32_per_sample_and_depends_on_t(time_input, B, C, H, W):
    torch.manual_seed(0)
    net = PotentialNet(**{**POTENTIAL, **dict(in_channels=C, resolution=H, channels=(8, 16, 24), time_input=time_input)})
    x = torch.randn(B, C, H, W)
    v0, v1 = net(x, torch.zeros(B)), net(x, torch.full((B,), 0.7))
    assert v0.shape == (B,) and v0.dtype == torch.float32
    assert (v0 - v1).abs().min() > 0, "V must depend on t for every sample"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vb = net(x, torch.full((B,), 0.7))
    assert vb.dtype == torch.float32 and vb.shape == (B,)
    assert net.bfloat16()(x.bfloat16(), torch.full((B,), 0.7)).dtype == torch.float32  # bf16 weights too


@pytest.mark.parametrize("time_input", ["channel", "film"])
def test_potential_gradients_reach_every_parameter(time_input):
    torch.manual_seed(0)
    net = PotentialNet(**{**POTENTIAL, **dict(channels=(8, 16, 24), time_input=time_input)})
    net(torch.randn(3, 3, 10, 10), torch.rand(3)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"


def test_potential_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="time_input must be 'channel' or 'film', got 'concat'"):
        PotentialNet(**{**POTENTIAL, "time_input": "concat"})
    with pytest.raises(ValueError, match=r"x must be a tensor \[B, 3, H, W\]"):
        PotentialNet(**POTENTIAL)(torch.randn(2, 1, 8, 8), torch.rand(2))


# ----------------------------------------------------------------------------- presets and counts

def test_count_parameters():
    assert count_parameters(torch.nn.Linear(3, 5)) == 3 * 5 + 5
    with torch.device("meta"):
        assert count_parameters(torch.nn.Conv2d(2, 4, 3)) == 2 * 4 * 9 + 4


# The presets live in configs/*.toml (one place); DriftUNet/PotentialNet are built from them as the
# trainer builds them. Drift nets are DDPM-style (res32 is DDPM's 35.7M CIFAR-10 net, celeba64 the
# paper scale); the potential's widths give count(potential)/count(drift) ≈ 1.4 % (paper).

def preset_archs(name):
    cfg = config.load(name, ["data.path=unused"] if name != "demo32" else [])
    return drift_arch(cfg), potential_arch(cfg)


def preset_counts(name):
    drift, potential = preset_archs(name)
    with torch.device("meta"):
        return count_parameters(DriftUNet(**drift)), count_parameters(PotentialNet(**potential))


@pytest.mark.parametrize("name", config.preset_names())
def test_preset_potential_to_drift_ratio(name):
    drift, potential = preset_counts(name)
    assert 0.005 <= potential / drift <= 0.03, f"{name}: {potential}/{drift} = {potential / drift:.4f}"
    with torch.device("meta"):  # the FiLM variant must stay in range too
        film = count_parameters(PotentialNet(**{**preset_archs(name)[1], "time_input": "film"}))
    assert 0.005 <= film / drift <= 0.03


def test_preset_ratios_centre_on_paper_value():
    ratios = [p / d for d, p in map(preset_counts, config.preset_names())]
    assert abs(sum(ratios) / len(ratios) - 0.014) < 0.002


def test_paper_preset_is_about_35m():
    drift, _ = preset_counts("celeba64")
    assert 30e6 <= drift <= 40e6
    assert 1e6 <= preset_counts("demo32")[0] <= 3e6
    assert preset_archs("res28")[0]["in_channels"] == 1
