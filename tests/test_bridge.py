"""Reference math of agm_fast.bridge against closed forms (docs/design.md §1)."""

import math

import pytest
import torch

from agm_fast import bridge


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0])
def test_bridge_moments_match_closed_form(t, sigma):
    n = 20000
    x1 = torch.tensor([0.7, -0.4, 0.1]).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    x0, eps = bridge.draw_bridge_noise(3, 0, torch.arange(n), x1.shape)
    xt = bridge.bridge_sample(x1, torch.full((n,), t), x0, eps, sigma).double()
    mean = t * x1[0].double()
    var = (1 - t) ** 2 + sigma**2 * t * (1 - t)
    se_mean = math.sqrt(var / n)
    assert torch.allclose(xt.mean(0), mean, atol=5 * se_mean)
    assert torch.allclose(xt.var(0), torch.full_like(mean, var), rtol=5 * math.sqrt(2 / n))


def test_stable_target_equals_definition_in_float64():
    g = torch.Generator().manual_seed(0)
    x1, x0, eps = (torch.randn(16, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.linspace(0.0, 1 - 1e-6, 16, dtype=torch.float64)
    for sigma in (0.0, 0.5, 2.0):
        xt = bridge.bridge_sample(x1, t, x0, eps, sigma)
        direct = (x1 - xt) / (1 - t).reshape(-1, 1, 1, 1)
        stable = bridge.drift_target(x1, x0, eps, t, sigma)
        assert torch.allclose(stable, direct, rtol=1e-7, atol=1e-6)


def test_t_sampling_respects_range():
    t = bridge.sample_t(0, 5, torch.arange(50000), t_min=0.2, t_eps=0.05)
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.95
    assert float(t.min()) < 0.21 and float(t.max()) > 0.94  # and it fills the range
    t0 = bridge.sample_t(0, 5, torch.arange(50000), t_min=0.0, t_eps=1e-3)
    assert float(t0.max()) <= 1 - 1e-3


def test_x1_parameterisation_gives_the_same_drift():
    g = torch.Generator().manual_seed(1)
    x1, x0, eps = (torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7, 0.99], dtype=torch.float64)
    xt = bridge.bridge_sample(x1, t, x0, eps, 0.5)
    u = bridge.drift_target(x1, x0, eps, t, 0.5)
    # a net that predicts x1 exactly implies the drift (x1 - x_t)/(1 - t) = u_t
    assert torch.allclose(bridge.drift_from_prediction(x1, xt, t, "x1"), u, atol=1e-9)
    assert torch.equal(bridge.drift_from_prediction(u, xt, t, "drift"), u)
    with pytest.raises(ValueError, match="predicts"):
        bridge.drift_from_prediction(u, xt, t, "score")


def test_hinge_loss_by_hand():
    v_pos = torch.tensor([0.0, 1.0, -2.0])
    v_neg = torch.tensor([2.0, 1.0, 0.5])
    # relu(1 + vp - vn): relu(-1)=0, relu(1)=1, relu(-1.5)=0 → mean 1/3
    assert bridge.potential_hinge_loss(v_pos, v_neg, 1.0).item() == pytest.approx(1 / 3)
    assert bridge.potential_hinge_loss(v_pos, v_neg, 3.0).item() == pytest.approx((1 + 3 + 0.5) / 3)


def _structured_images(b=4, c=3, h=16, w=16):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    img = torch.stack([xx, yy, (xx * yy)])[:c]
    return torch.stack([img * (0.5 + 0.1 * i) for i in range(b)])


def test_pixel_shuffle_keeps_colour_histogram_and_destroys_structure():
    x1 = _structured_images()
    neg = bridge.negatives(x1, "pixel_shuffle", 0, 0, torch.arange(4), patch=4)
    for b in range(4):
        a = x1[b].reshape(3, -1).T.tolist()
        n = neg[b].reshape(3, -1).T.tolist()
        assert sorted(map(tuple, a)) == sorted(map(tuple, n))  # same multiset of pixel colours
    # structure: neighbouring pixels are highly correlated in x1, not in the negative
    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert neighbour_corr(x1) > 0.9 and abs(neighbour_corr(neg)) < 0.3
    # keyed: same key same permutation, different step another one
    assert torch.equal(neg, bridge.negatives(x1, "pixel_shuffle", 0, 0, torch.arange(4), patch=4))
    assert not torch.equal(neg, bridge.negatives(x1, "pixel_shuffle", 0, 1, torch.arange(4), patch=4))


def test_patch_shuffle_and_noise_negatives():
    x1 = _structured_images(h=18, w=18)
    p = bridge.negatives(x1, "patch_shuffle", 0, 0, torch.arange(4), patch=4)
    assert torch.equal(p[:, :, 16:, :], x1[:, :, 16:, :])  # remainder strip untouched
    assert not torch.equal(p, x1)
    assert sorted(p.flatten().tolist()) == sorted(x1.flatten().tolist())
    nz = bridge.negatives(x1, "noise", 0, 0, torch.arange(4), patch=4)
    assert torch.allclose(nz.mean((2, 3)), x1.mean((2, 3)), atol=0.15)
    with pytest.raises(ValueError, match="negatives"):
        bridge.negatives(x1, "blur", 0, 0, torch.arange(4), patch=4)


@pytest.mark.parametrize("favour", ["coherent", "degenerate"])
@pytest.mark.parametrize("tau,clip", [(1.0, 2.0), (0.5, 1.0), (2.0, math.inf)])
def test_weights_mean_one_and_ratio_bound(favour, tau, clip):
    v = torch.randn(257, generator=torch.Generator().manual_seed(2)) * 10
    v[0] = 1e4  # an outlier: clipping must bound its effect
    w = bridge.importance_weights(v, scheme="softmax", favour=favour, tau=tau, clip=clip)
    assert w.dtype == torch.float32 and w.shape == (257,)
    assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)
    if math.isfinite(clip):
        assert float(w.max() / w.min()) <= bridge.weight_ratio_bound(clip, tau) * (1 + 1e-5)
    lo, hi = int(v.argmin()), int(v.argmax())
    if favour == "coherent":  # low V (coherent) gets the larger weight
        assert w[lo] > w[hi]
    else:
        assert w[hi] > w[lo]


def test_uniform_batch_of_one_and_equal_potentials():
    v = torch.randn(8)
    kw = dict(favour="coherent", tau=1.0, clip=2.0)
    assert torch.equal(bridge.importance_weights(v, scheme="uniform", **kw), torch.ones(8))
    assert torch.equal(bridge.importance_weights(torch.tensor([3.0]), scheme="softmax", **kw), torch.ones(1))
    assert torch.equal(bridge.importance_weights(torch.full((5,), 2.0), scheme="softmax", **kw), torch.ones(5))
    with pytest.raises(ValueError, match="scheme must be 'softmax' or 'uniform', got 'boltzmann'"):
        bridge.importance_weights(v, scheme="boltzmann", **kw)


def test_uniform_scheme_is_plain_mse():
    g = torch.Generator().manual_seed(3)
    pred, x1 = torch.randn(5, 3, 7, 7, generator=g), torch.randn(5, 3, 7, 7, generator=g)
    t = torch.rand(5, generator=g) * 0.9
    idx = torch.arange(5)
    out = bridge.weighted_bridge_loss(pred, x1, t, torch.randn(5), seed=0, step=0, sample_index=idx,
                                      sigma=0.5, predicts="drift", scheme="uniform", favour="coherent",
                                      tau=1.0, clip=2.0)
    x0, eps = bridge.draw_bridge_noise(0, 0, idx, x1.shape)
    mse = torch.nn.functional.mse_loss(pred, bridge.drift_target(x1, x0, eps, t, 0.5))
    assert out.loss.item() == pytest.approx(mse.item(), rel=1e-6)
    assert torch.equal(out.weights, torch.ones(5))


def test_chunks_add_up_to_the_whole_batch():
    g = torch.Generator().manual_seed(4)
    pred, x1 = torch.randn(6, 3, 5, 5, generator=g), torch.randn(6, 3, 5, 5, generator=g)
    t, v = torch.rand(6, generator=g) * 0.9, torch.randn(6, generator=g)
    kw = dict(seed=1, step=2, sigma=0.5, predicts="drift", scheme="softmax", favour="coherent", tau=1.0, clip=2.0)
    whole = bridge.weighted_bridge_loss(pred, x1, t, v, sample_index=torch.arange(6), **kw)
    parts = [bridge.weighted_bridge_loss(pred[s], x1[s], t[s], v, sample_index=torch.arange(6)[s],
                                         v_offset=s.start, normalizer=6, **kw) for s in (slice(0, 2), slice(2, 6))]
    assert sum(p.loss.item() for p in parts) == pytest.approx(whole.loss.item(), rel=1e-6)
    assert torch.equal(torch.cat([p.weights for p in parts]), whole.weights)


def test_weights_depend_on_x_t_and_t_only():
    """Changing x1 and ε while x_t and t stay fixed changes no weight (V sees only (x_t, t))."""
    torch.manual_seed(0)
    potential = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.SiLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))
    def V(xt, t):
        return potential(torch.cat([xt, t.reshape(-1, 1, 1, 1).expand(-1, 1, *xt.shape[2:])], 1))[:, 0]
    b, sigma = 6, 0.5
    t = torch.rand(b) * 0.8 + 0.1
    x1, x0, eps = torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8)
    xt = bridge.bridge_sample(x1, t, x0, eps, sigma)
    # another (x1, ε) with the same x_t: solve x_t = (1-t)x0' + t x1' + σ√(t(1-t)) ε' for x0'
    x1b, epsb = torch.randn_like(x1), torch.randn_like(eps)
    tb = t.reshape(-1, 1, 1, 1)
    x0b = (xt - tb * x1b - sigma * torch.sqrt(tb * (1 - tb)) * epsb) / (1 - tb)
    xtb = bridge.bridge_sample(x1b, t, x0b, epsb, sigma)
    assert torch.allclose(xt, xtb, atol=1e-5)
    kw = dict(scheme="softmax", favour="coherent", tau=1.0, clip=2.0)
    wa = bridge.importance_weights(V(xt, t), **kw)
    wb = bridge.importance_weights(V(xtb, t), **kw)
    assert torch.allclose(wa, wb, atol=1e-4)


def test_effective_sample_size():
    assert float(bridge.effective_sample_size(torch.ones(10))) == pytest.approx(10)
    w = torch.zeros(10)
    w[3] = 10
    assert float(bridge.effective_sample_size(w)) == pytest.approx(1)
