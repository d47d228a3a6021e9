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


# ----------------------------------------------------------------------------- normalise = t_bins

TB_KW = dict(scheme="softmax", normalise="t_bins")


def _weights_t_bins(v, t, k, favour="coherent", tau=1.0, clip=2.0):
    return bridge.importance_weights(v, favour=favour, tau=tau, clip=clip, t=t, t_bins=k, **TB_KW)


def test_t_bin_ids_are_rank_quantiles_with_ties_by_position():
    t = torch.tensor([0.5, 0.1, 0.5, 0.9, 0.1, 0.3, 0.5])  # ranks by (t, position): 3 0 4 6 1 2 5
    assert bridge.t_bin_ids(t, 3).tolist() == [1, 0, 1, 2, 0, 0, 2]  # ⌊r·3/7⌋
    assert bridge.t_bin_ids(torch.full((5,), 0.4), 2).tolist() == [0, 0, 0, 1, 1]  # equal t: by position
    assert bridge.t_bin_ids(t, 1).tolist() == [0] * 7
    assert bridge.t_bin_ids(t, 50).tolist() == [3, 0, 4, 6, 1, 2, 5]  # K ≥ B: one sample per bin
    counts = torch.bincount(bridge.t_bin_ids(torch.rand(10), 4))
    assert counts.tolist() == [3, 2, 3, 2]  # bin k holds ranks ceil(kB/K) … ceil((k+1)B/K) - 1


def test_t_bins_standardise_within_each_bin_by_hand():
    t = torch.tensor([0.1, 0.2, 0.8, 0.9])
    v = torch.tensor([0.0, 2.0, 10.0, 30.0])  # bins {0, 1} and {2, 3}: s = (-1, 1, -1, 1)
    w = _weights_t_bins(v, t, 2, clip=math.inf)
    e = math.e
    want = torch.tensor([e, 1 / e, e, 1 / e]) * 4 / (2 * e + 2 / e)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=0)
    # over the whole batch the later bin's V would dominate: the batch scheme ranks all four
    w_batch = bridge.importance_weights(v, scheme="softmax", favour="coherent", tau=1.0, clip=math.inf)
    assert w_batch[2] < w_batch[1] and not torch.allclose(w, w_batch)


@pytest.mark.parametrize("favour", ["coherent", "degenerate"])
@pytest.mark.parametrize("tau,clip,k", [(1.0, 2.0, 4), (0.5, 1.0, 3), (2.0, math.inf, 7), (0.3, 2.0, 2)])
def test_t_bins_weights_mean_one_and_ratio_bound(favour, tau, clip, k):
    gen = torch.Generator().manual_seed(5)
    b = 257
    t = torch.rand(b, generator=gen)
    v = torch.randn(b, generator=gen) * 10 + 20 * t  # V drifts with t, as in the demo
    v[0] = 1e4  # an outlier
    w = _weights_t_bins(v, t, k, favour=favour, tau=tau, clip=clip)
    assert w.dtype == torch.float32 and w.shape == (b,)
    assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)
    if math.isfinite(clip):
        assert float(w.max() / w.min()) <= bridge.weight_ratio_bound(clip, tau) * (1 + 1e-5)
    hi = int(v.argmax())  # the outlier is the top of its own bin
    assert (w[hi] < w.median()) if favour == "coherent" else (w[hi] > w.median())


def test_t_bins_remove_the_drift_of_v_with_t():
    """V = a(t) + noise: the batch scheme weights by t, t_bins by the noise within each bin."""
    gen = torch.Generator().manual_seed(6)
    b, k = 256, 4
    t = torch.rand(b, generator=gen)
    noise = torch.randn(b, generator=gen)
    v = 50.0 * (t > 0.5) + noise
    kw = dict(scheme="softmax", favour="coherent", tau=1.0, clip=2.0)
    early = bridge.t_bin_ids(t, k) < 2
    w_batch = bridge.importance_weights(v, **kw)
    w_bins = bridge.importance_weights(v, normalise="t_bins", t=t, t_bins=k, **kw)
    assert w_batch[early].mean() > 2 * w_batch[~early].mean()  # batch: low t (low V) dominates
    assert float(w_bins[early].mean()) == pytest.approx(float(w_bins[~early].mean()), rel=0.15)
    # within a bin, the lower noise still wins
    one = bridge.t_bin_ids(t, k) == 3
    assert w_bins[one][noise[one].argmin()] > w_bins[one][noise[one].argmax()]


def test_t_bins_with_one_bin_equals_batch_and_degenerate_cases():
    gen = torch.Generator().manual_seed(7)
    v, t = torch.randn(33, generator=gen) * 3, torch.rand(33, generator=gen)
    for favour, tau, clip in (("coherent", 1.0, 2.0), ("degenerate", 0.5, math.inf)):
        kw = dict(scheme="softmax", favour=favour, tau=tau, clip=clip)
        batch = bridge.importance_weights(v, **kw)
        torch.testing.assert_close(bridge.importance_weights(v, normalise="t_bins", t=t, t_bins=1, **kw),
                                   batch, rtol=1e-6, atol=0)
        # all t equal and K = 1: one bin, the batch's weights (K > 1 splits equal t by position)
        same_t = bridge.importance_weights(v, normalise="t_bins", t=torch.full((33,), 0.5), t_bins=1, **kw)
        torch.testing.assert_close(same_t, batch, rtol=1e-6, atol=0)
    kw = dict(scheme="softmax", favour="coherent", tau=1.0, clip=2.0, normalise="t_bins")
    assert torch.equal(bridge.importance_weights(torch.tensor([3.0]), t=torch.tensor([0.2]), t_bins=4, **kw),
                       torch.ones(1))
    assert torch.equal(bridge.importance_weights(v, t=t, t_bins=33, **kw), torch.ones(33))  # bins of one
    assert torch.equal(bridge.importance_weights(v, t=t, t_bins=100, **kw), torch.ones(33))
    v_eq = (bridge.t_bin_ids(t, 3) * 2.0 - 1.0)  # equal V within each bin, different across bins
    assert torch.equal(bridge.importance_weights(v_eq, t=t, t_bins=3, **kw), torch.ones(33))
    # one bin of equal V, the others spread: that bin's s is 0
    v_mixed = torch.where(bridge.t_bin_ids(t, 3) == 0, 5.0, v)
    w = bridge.importance_weights(v_mixed, t=t, t_bins=3, **kw)
    zero_bin = bridge.t_bin_ids(t, 3) == 0
    assert torch.allclose(w[zero_bin], w[zero_bin][0].expand(int(zero_bin.sum())))
    assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)
    uniform = dict(kw, scheme="uniform")
    assert torch.equal(bridge.importance_weights(v, t=t, t_bins=4, **uniform), torch.ones(33))


def test_t_bins_bad_arguments():
    v, t = torch.randn(6), torch.rand(6)
    kw = dict(scheme="softmax", favour="coherent", tau=1.0, clip=2.0)
    with pytest.raises(ValueError, match="normalise must be 'batch' or 't_bins', got 'rank'"):
        bridge.importance_weights(v, normalise="rank", t=t, **kw)
    with pytest.raises(ValueError, match="t_bins must be an integer >= 1"):
        bridge.importance_weights(v, normalise="t_bins", t=t, t_bins=0, **kw)
    with pytest.raises(TypeError, match="needs t"):
        bridge.importance_weights(v, normalise="t_bins", t_bins=2, **kw)
    with pytest.raises(ValueError, match="t holds 5 times but V holds 6"):
        bridge.importance_weights(v, normalise="t_bins", t=t[:5], t_bins=2, **kw)


def test_t_bins_loss_chunks_use_the_whole_batch_bins():
    g = torch.Generator().manual_seed(8)
    pred, x1 = torch.randn(7, 3, 5, 5, generator=g), torch.randn(7, 3, 5, 5, generator=g)
    t, v = torch.rand(7, generator=g) * 0.9, torch.randn(7, generator=g)
    kw = dict(seed=1, step=2, sigma=0.5, predicts="drift", scheme="softmax", favour="degenerate", tau=0.7,
              clip=2.0, normalise="t_bins", t_bins=3, t_all=t)
    whole = bridge.weighted_bridge_loss(pred, x1, t, v, sample_index=torch.arange(7), **kw)
    torch.testing.assert_close(whole.weights, _weights_t_bins(v, t, 3, favour="degenerate", tau=0.7))
    parts = [bridge.weighted_bridge_loss(pred[s], x1[s], t[s], v, sample_index=torch.arange(7)[s],
                                         v_offset=s.start, normalizer=7, **kw) for s in (slice(0, 3), slice(3, 7))]
    assert sum(p.loss.item() for p in parts) == pytest.approx(whole.loss.item(), rel=1e-6)
    assert torch.equal(torch.cat([p.weights for p in parts]), whole.weights)
    with pytest.raises(TypeError, match="needs t_all"):
        bridge.weighted_bridge_loss(pred, x1, t, v, sample_index=torch.arange(7), **dict(kw, t_all=None))
