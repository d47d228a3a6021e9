"""AGMStep is checked against the method itself, not only against other code paths (issue 9).

The other suites show that fast paths equal their references and that a resumed run repeats an
uninterrupted one. A trainer that pushes coherent bridges to high V, or whose EMA, learning-rate
or clipping schedule is wrong, passes all of them. Here:

1. One AGM iteration written out by hand from docs/design.md §1, in fp64, on tiny MLPs: keyed
   noise from agm_fast.rng, the bridge, the pixel-shuffle negatives, the hinge loss (paper
   Eq. 10), the importance weights, the weighted drift loss (paper Eq. 13), the gradient
   norms and clipping, AdamW (moments, bias correction, eps, decoupled weight decay), the
   warm-up / cosine learning rate and the EMA. Nothing from agm_fast.step, agm_fast.dispatch or
   agm_fast.bridge is used. Two consecutive steps of AGMStep from the same weights and data must
   land on the same parameters, EMA, Adam moments, clipped gradients, learning rates and logged
   grad norms.
2. A short run on data with obvious structure (smooth ramps, whose pixel-shuffled copies are
   rough): V must end up lower on coherent bridges than on degenerate ones, and the weights
   must lean the way weights.favour says.
3. The non-finite guard: a NaN step changes nothing.
"""

import copy
import math

import pytest
import torch
from torch import nn

from agm_fast import config, dispatch, rng
from agm_fast.step import AGMStep, build_optimisers

ADAM_EPS = 1e-8  # torch's AdamW default; the trainer does not change it
CLIP_EPS = 1e-6  # torch's clip_grad_norm_ divides by norm + 1e-6; far inside the tolerances below

BASE = ["train.kernels=torch", "train.precision=fp32", "train.device=cpu", "train.batch_size=8",
        "train.steps=40", "optim.lr=1e-2", "optim.lr_potential=5e-3", "optim.warmup_steps=10",
        "ema.halflife_kimg=0.05"]  # β = 0.5^(8/50) ≈ 0.90: far from 1/2, so a reversed lerp shows


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny nets run faster on one thread


def make_cfg(*overrides):
    return config.load("demo32", BASE + list(overrides))


# ----------------------------------------------------------------------------- tiny nets

class MLPDrift(nn.Module):
    """f(x, t) → x's shape. The buffer counts the images seen, so that the EMA's buffer copy shows;
    `log` records the order of forward calls."""

    def __init__(self, shape, hidden=32, log=None):
        super().__init__()
        self.shape, self.log = tuple(shape), log
        d = math.prod(shape)
        self.inp, self.out = nn.Linear(d + 1, hidden), nn.Linear(hidden, d)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x, t):
        if self.log is not None:
            self.log.append(("f", x.shape[0]))
        self.seen += x.shape[0]
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)))
        return self.out(h).reshape(x.shape)


class MLPPotential(nn.Module):
    """V(x, t) → [B]."""

    def __init__(self, shape, hidden=16, log=None):
        super().__init__()
        self.log = log
        self.inp, self.out = nn.Linear(math.prod(shape) + 1, hidden), nn.Linear(hidden, 1)

    def forward(self, x, t):
        if self.log is not None:
            self.log.append(("V", x.shape[0]))
        return self.out(torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)))).squeeze(1)


class ConvPotential(nn.Module):
    """V(x, t) → [B]: one 3×3 conv on [x, t], ReLU, mean pool, linear. It can measure roughness
    (sums of |neighbour differences|), which is what separates a ramp from its shuffled copy."""

    def __init__(self, channels, width=16):
        super().__init__()
        self.conv, self.head = nn.Conv2d(channels + 1, width, 3, padding=1), nn.Linear(width, 1)

    def forward(self, x, t):
        tc = t.to(x.dtype)[:, None, None, None].expand(x.shape[0], 1, *x.shape[2:])
        return self.head(torch.relu(self.conv(torch.cat([x, tc], 1))).mean((2, 3))).squeeze(1)


def build(cfg, drift, potential):
    """EMA, optimisers and AGMStep as agm_fast/trainer.py builds them. The EMA starts away from
    the drift so that the direction of its interpolation is visible after one step."""
    ema = copy.deepcopy(drift).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(-0.5).add_(0.05)
    opt_f, opt_v = build_optimisers(cfg, drift, potential, "for_loop")
    step = AGMStep(cfg, drift, potential, ema, opt_f, opt_v, device=torch.device("cpu"), kernels="torch",
                   autocast_dtype=None)
    return ema, opt_f, opt_v, step


# ----------------------------------------------------------------------------- the written-out iteration

def hand_lr_factor(k, cfg):
    """docs/design.md §1 "LR schedule"."""
    o, S = cfg.optim, cfg.train.steps
    W = o.warmup_steps
    if k < W:
        return (k + 1) / W
    if o.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - W) / max(1, S - W))))


def hand_pixel_shuffle(x1, seed, k, indices):
    """One permutation of pixel positions per image (argsort of NEGATIVES-stream uniforms),
    shared by its channels."""
    b, c, h, w = x1.shape
    perm = torch.argsort(rng.uniform(seed, k, indices, rng.Stream.NEGATIVES, numel=h * w), dim=1)
    flat = x1.reshape(b, c, h * w)
    return torch.stack([flat[i][:, perm[i]] for i in range(b)]).reshape(x1.shape)


class HandAGM:
    """AGM in fp64 from docs/design.md §1, with AdamW written out. Holds its own copies of the
    nets, the EMA and the Adam moments."""

    def __init__(self, cfg, drift, potential, ema):
        self.cfg = cfg
        self.f = copy.deepcopy(drift).double()
        self.V = copy.deepcopy(potential).double()
        self.ema = copy.deepcopy(ema).double()
        for net in (self.f, self.V):
            net.log = None
        self.adam = {"f": self._fresh(self.f), "V": self._fresh(self.V)}

    @staticmethod
    def _fresh(net):
        return {"step": 0, "m": [torch.zeros_like(p) for p in net.parameters()],
                "v": [torch.zeros_like(p) for p in net.parameters()]}

    def step(self, indices, x1, k):
        cfg = self.cfg
        seed, sigma, B = cfg.train.seed, cfg.bridge.sigma, x1.shape[0]
        # t ~ U[t_min, 1 - t_eps] from lane 0 of the T stream; x0, ε from X0 and EPS
        u = rng.uniform(seed, k, indices, rng.Stream.T)[:, 0].double()
        t = cfg.bridge.t_min + (1 - cfg.bridge.t_eps - cfg.bridge.t_min) * u
        x0 = rng.normal_like(tuple(x1.shape), seed, k, indices, rng.Stream.X0).double()
        eps = rng.normal_like(tuple(x1.shape), seed, k, indices, rng.Stream.EPS).double()
        x1 = x1.double()
        x1_neg = hand_pixel_shuffle(x1, seed, k, indices)
        tb = t[:, None, None, None]
        x_pos = (1 - tb) * x0 + tb * x1 + sigma * torch.sqrt(tb * (1 - tb)) * eps
        x_neg = (1 - tb) * x0 + tb * x1_neg + sigma * torch.sqrt(tb * (1 - tb)) * eps

        # paper Eq. 10: coherent bridges get low V
        v_pos, v_neg = self.V(x_pos, t), self.V(x_neg, t)
        loss_v = torch.relu(cfg.potential.margin + v_pos - v_neg).mean()
        g_v = list(torch.autograd.grad(loss_v, list(self.V.parameters())))

        # importance weights from sg[V(x_t⁺)] of the whole batch
        wc, v = cfg.weights, v_pos.detach()
        if wc.scheme == "uniform":
            w = torch.ones(B, dtype=torch.float64)
            s = torch.zeros(B, dtype=torch.float64)
        else:
            s = ((v - v.mean()) / (v - v.mean()).square().mean().sqrt()).clamp(-wc.clip, wc.clip)
            e = torch.exp((-s if wc.favour == "coherent" else s) / wc.tau)
            w = B * e / e.sum()

        # paper Eq. 13
        pred = self.f(x_pos, t)
        if cfg.model.predicts == "drift":
            target = x1 - x0 - sigma * torch.sqrt(tb / (1 - tb)) * eps
            # the stable form equals (x1 - x_t)/(1 - t)
            torch.testing.assert_close(target, (x1 - x_pos) / (1 - tb), rtol=1e-9, atol=1e-9)
        else:
            target = x1
        per_sample = (pred - target).square().flatten(1).mean(1)
        loss_f = (w * per_sample).mean()
        g_f = list(torch.autograd.grad(loss_f, list(self.f.parameters())))

        # clip each net separately; the logged norms are the pre-clip ones
        norms = {}
        for name, g in (("f", g_f), ("V", g_v)):
            norms[name] = torch.sqrt(sum(gi.square().sum() for gi in g))
            if cfg.optim.grad_clip > 0:
                scale = min(1.0, cfg.optim.grad_clip / norms[name].item())
                g[:] = [gi * scale for gi in g]

        # AdamW, by hand
        factor = hand_lr_factor(k, cfg)
        lrs = {"f": cfg.optim.lr * factor, "V": cfg.optim.lr_potential * factor}
        b1, b2 = cfg.optim.betas
        wd = cfg.optim.weight_decay
        with torch.no_grad():
            for name, net, grads in (("f", self.f, g_f), ("V", self.V, g_v)):
                st, lr = self.adam[name], lrs[name]
                st["step"] += 1
                n = st["step"]
                for p, g, m, vv in zip(net.parameters(), grads, st["m"], st["v"]):
                    m.mul_(b1).add_((1 - b1) * g)
                    vv.mul_(b2).add_((1 - b2) * g * g)
                    p.mul_(1 - lr * wd)  # decoupled weight decay
                    m_hat, v_hat = m / (1 - b1 ** n), vv / (1 - b2 ** n)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + ADAM_EPS))
            # EMA with β = 0.5^(batch / half-life in images); buffers copied
            beta = 0.5 ** (cfg.train.batch_size / (cfg.ema.halflife_kimg * 1000))
            for pe, p in zip(self.ema.parameters(), self.f.parameters()):
                pe.copy_(beta * pe + (1 - beta) * p)
            for be, b in zip(self.ema.buffers(), self.f.buffers()):
                be.copy_(b)
        return dict(loss_f=loss_f.item(), loss_v=loss_v.item(), norm_f=norms["f"].item(),
                    norm_v=norms["V"].item(), grads_f=g_f, grads_v=g_v, lrs=lrs, s=s, w=w)


def assert_close_list(actual, expected, what, rtol=2e-4, atol=2e-6):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a.detach().double(), e.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def assert_grads_close(actual, expected, what):
    scale = max(e.abs().max().item() for e in expected)
    assert_close_list(actual, expected, what, rtol=2e-4, atol=1e-5 * scale)


# Each case: overrides, the first step index k (two steps are taken: k and k+1), and why.
CASES = {
    # warm-up (k=3 → lr factor 0.4, then 0.5), clipping active on both nets
    "coherent-warmup-clipped": (["weights.favour=coherent", "model.predicts=drift", "optim.grad_clip=0.05"], 3),
    # cosine after warm-up, clipping off, decoupled weight decay, x̂1 parameterisation, t_min > 0
    "degenerate-cosine-unclipped-decay": (["weights.favour=degenerate", "model.predicts=x1", "optim.grad_clip=0",
                                           "optim.schedule=cosine", "optim.weight_decay=0.5",
                                           "bridge.t_min=0.1"], 17),
    # micro-batches of 4: V for both first, weights over all 8; first step k=0 (factor 1/W);
    # tight weight clamp and τ ≠ 1
    "coherent-microbatch-clamped": (["weights.favour=coherent", "model.predicts=drift", "train.micro_batch=4",
                                     "optim.grad_clip=0.05", "optim.weight_decay=0.1", "weights.clip=0.5",
                                     "weights.tau=0.5"], 0),
    # micro-batches of 2, across the end of warm-up into cosine, rectified flow (σ = 0)
    "degenerate-microbatch-cosine": (["weights.favour=degenerate", "model.predicts=drift", "train.micro_batch=2",
                                      "optim.grad_clip=0.02", "optim.schedule=cosine", "bridge.sigma=0"], 9),
    # the baseline: w ≡ 1
    "uniform": (["weights.scheme=uniform", "model.predicts=drift", "optim.grad_clip=0.05"], 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_steps_equal_a_written_out_agm_iteration_with_hand_adamw(case):
    overrides, k0 = CASES[case]
    cfg = make_cfg(*overrides)
    shape, B = (3, 4, 4), cfg.train.batch_size
    torch.manual_seed(0)
    log = []
    drift, potential = MLPDrift(shape, log=log), MLPPotential(shape, log=log)
    ema, opt_f, opt_v, agm = build(cfg, drift, potential)
    hand = HandAGM(cfg, drift, potential, ema)
    g = torch.Generator().manual_seed(1)

    for k in (k0, k0 + 1):
        x1 = torch.rand((B, *shape), generator=g) * 2 - 1
        indices = torch.arange(B, dtype=torch.int64) + k * B
        log.clear()
        diag = agm(indices, x1, k)
        ref = hand.step(indices, x1, k)
        at = f"{case}, step {k}"

        assert bool(diag["finite"]), at
        micro = cfg.train.micro_batch or B
        # V for every micro-batch (x_t⁺ and x_t⁻) before any drift forward
        assert log == [("V", micro)] * (2 * B // micro) + [("f", micro)] * (B // micro), at

        assert diag["loss_v"].item() == pytest.approx(ref["loss_v"], rel=1e-5), at
        assert diag["loss_f"].item() == pytest.approx(ref["loss_f"], rel=1e-5), at
        assert diag["grad_norm_f"].item() == pytest.approx(ref["norm_f"], rel=1e-5), at
        assert diag["grad_norm_v"].item() == pytest.approx(ref["norm_v"], rel=1e-5), at
        if cfg.optim.grad_clip > 0:  # the case really exercises clipping
            assert ref["norm_f"] > 2 * cfg.optim.grad_clip and ref["norm_v"] > 2 * cfg.optim.grad_clip, at
        if case == "coherent-microbatch-clamped":  # ... and the clamp of the standardised V
            assert ref["s"].abs().max().item() == pytest.approx(cfg.weights.clip), at
        assert diag["ess"].item() == pytest.approx((ref["w"].sum() ** 2 / ref["w"].square().sum()).item(),
                                                   rel=1e-5), at
        assert diag["w_max"].item() == pytest.approx(ref["w"].max().item(), rel=1e-5), at
        assert diag["w_min"].item() == pytest.approx(ref["w"].min().item(), rel=1e-5), at

        # learning rates as scheduled, in the param groups the optimisers used
        assert opt_f.param_groups[0]["lr"] == pytest.approx(ref["lrs"]["f"], rel=1e-12), at
        assert opt_v.param_groups[0]["lr"] == pytest.approx(ref["lrs"]["V"], rel=1e-12), at
        # the gradients the optimisers stepped with: scaled by min(1, clip/norm), or raw
        assert_grads_close([p.grad for p in drift.parameters()], ref["grads_f"], f"{at}: drift grad")
        assert_grads_close([p.grad for p in potential.parameters()], ref["grads_v"], f"{at}: potential grad")
        # Adam moments, then the parameters and the EMA
        for opt, net, name in ((opt_f, drift, "f"), (opt_v, potential, "V")):
            states = [opt.state[p] for p in net.parameters()]
            assert all(int(s["step"]) == hand.adam[name]["step"] for s in states), at
            assert_grads_close([s["exp_avg"] for s in states], hand.adam[name]["m"], f"{at}: {name} exp_avg")
            sq = hand.adam[name]["v"]
            assert_close_list([s["exp_avg_sq"] for s in states], sq, f"{at}: {name} exp_avg_sq", rtol=4e-4,
                              atol=1e-5 * max(v.abs().max().item() for v in sq))
        assert_close_list(list(drift.parameters()), list(hand.f.parameters()), f"{at}: drift")
        assert_close_list(list(potential.parameters()), list(hand.V.parameters()), f"{at}: potential")
        assert_close_list(list(ema.parameters()), list(hand.ema.parameters()), f"{at}: EMA")
        assert_close_list(list(ema.buffers()), list(hand.ema.buffers()), f"{at}: EMA buffers", rtol=0, atol=0)


def test_the_lr_schedule_is_the_documented_one_at_every_step():
    """The lr in both optimisers' param groups over a whole run: warm-up (k+1)/W from step 0,
    then cosine to 0 at train.steps, and 0 after it."""
    cfg = make_cfg("optim.schedule=cosine", "optim.warmup_steps=4", "train.steps=12", "train.batch_size=2",
                   "model.predicts=drift")
    torch.manual_seed(0)
    drift, potential = MLPDrift((1, 4, 4), hidden=4), MLPPotential((1, 4, 4), hidden=4)
    _, opt_f, opt_v, agm = build(cfg, drift, potential)
    x1 = torch.rand(2, 1, 4, 4) * 2 - 1
    seen = []
    for k in range(cfg.train.steps + 2):  # past train.steps the factor stays at 0
        agm(torch.arange(2) + 2 * k, x1, k)
        seen.append((opt_f.param_groups[0]["lr"] / cfg.optim.lr, opt_v.param_groups[0]["lr"] / cfg.optim.lr_potential))
    expect = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * min(1, j / 8))) for j in range(10)]
    assert [f for f, _ in seen] == pytest.approx(expect, abs=1e-12)
    assert [f for _, f in seen] == pytest.approx(expect, abs=1e-12)


# ----------------------------------------------------------------------------- a short run

def ramps(n, size, generator):
    """Smooth images: linear ramps in a random direction with a random amplitude, in [-1, 1].
    Their pixel-shuffled copies keep the histogram and are rough everywhere."""
    ang = torch.rand(n, generator=generator) * 2 * math.pi
    amp = 0.6 + 0.4 * torch.rand(n, generator=generator)
    c = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    img = (torch.cos(ang)[:, None, None] * xx + torch.sin(ang)[:, None, None] * yy) / ((size - 1) / 2)
    return (amp[:, None, None] * img).clamp(-1, 1)[:, None]


RUN = ["model.predicts=drift", "train.batch_size=16", "train.steps=150", "optim.lr=3e-3",
       "optim.lr_potential=2e-2", "optim.warmup_steps=5", "bridge.sigma=0.2", "bridge.t_min=0.3",
       "weights.favour=coherent"]


@pytest.fixture(scope="module")
def trained():
    """150 steps on 1×8×8 ramps (about 2 s): the nets, the data and the last diagnostics."""
    cfg = make_cfg(*RUN)
    torch.manual_seed(0)
    drift, potential = MLPDrift((1, 8, 8), hidden=16), ConvPotential(1)
    _, _, _, agm = build(cfg, drift, potential)
    data = ramps(64, 8, torch.Generator().manual_seed(2))
    B, rows = cfg.train.batch_size, []
    for k in range(cfg.train.steps):
        idx = torch.arange(B, dtype=torch.int64) + k * B
        diag = agm(idx, data[idx % len(data)], k)
        rows.append({n: diag[n].item() for n in ("v_gap", "hinge_active", "loss_v", "ess")})
    return cfg, drift, potential, data, rows


def test_a_short_run_gives_coherent_bridges_lower_v(trained):
    cfg, _, potential, data, rows = trained
    last = rows[-20:]
    first_gap = sum(r["v_gap"] for r in rows[:5]) / 5
    gap = sum(r["v_gap"] for r in last) / len(last)
    hinge = sum(r["hinge_active"] for r in last) / len(last)
    assert gap > max(cfg.potential.margin, first_gap + 0.5), (first_gap, gap)  # V⁻ − V⁺ grew past the margin
    assert hinge < 0.3, hinge                                                  # most pairs satisfy the margin
    assert sum(r["loss_v"] for r in last) / len(last) < 0.5 * rows[0]["loss_v"]

    # on fresh bridges built here (not by the trainer), V(x_t⁺) < V(x_t⁻) for most samples
    B, k = 64, 10_000
    idx = torch.arange(B, dtype=torch.int64) + 10**6
    x1 = ramps(B, 8, torch.Generator().manual_seed(3))
    t = torch.full((B,), 0.7)
    x0 = rng.normal_like(tuple(x1.shape), 5, k, idx, rng.Stream.X0)
    eps = rng.normal_like(tuple(x1.shape), 5, k, idx, rng.Stream.EPS)
    tb, s = t[:, None, None, None], cfg.bridge.sigma
    noise = (1 - tb) * x0 + s * torch.sqrt(tb * (1 - tb)) * eps
    with torch.no_grad():
        v_pos = potential(noise + tb * x1, t)
        v_neg = potential(noise + tb * hand_pixel_shuffle(x1, 5, k, idx), t)
    assert (v_pos < v_neg).float().mean().item() > 0.9
    assert (v_neg - v_pos).mean().item() > cfg.potential.margin


def spy_weights(monkeypatch):
    """Record the importance weights the step applies (dispatch.weighted_bridge_loss's output)."""
    real, seen = dispatch.weighted_bridge_loss, []

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(out.weights.detach().clone())
        return out
    monkeypatch.setattr(dispatch, "weighted_bridge_loss", spy)
    return seen


@pytest.mark.parametrize("scheme,favour", [("softmax", "coherent"), ("softmax", "degenerate"),
                                           ("uniform", "coherent")])
def test_after_a_short_run_the_weights_lean_the_way_favour_says(trained, monkeypatch, scheme, favour):
    cfg0, drift0, potential0, data, _ = trained
    cfg = make_cfg(*RUN, f"weights.scheme={scheme}", f"weights.favour={favour}", "train.micro_batch=8")
    drift, potential = copy.deepcopy(drift0), copy.deepcopy(potential0)
    _, _, _, agm = build(cfg, drift, potential)
    B, k = cfg.train.batch_size, cfg.train.steps
    idx = torch.arange(B, dtype=torch.int64) + k * B
    x1 = data[idx % len(data)]
    # V(x_t⁺) computed here from the keyed noise, with φ before the step (the step's V is too)
    u = rng.uniform(cfg.train.seed, k, idx, rng.Stream.T)[:, 0]
    t = cfg.bridge.t_min + (1 - cfg.bridge.t_eps - cfg.bridge.t_min) * u
    x0 = rng.normal_like(tuple(x1.shape), cfg.train.seed, k, idx, rng.Stream.X0)
    eps = rng.normal_like(tuple(x1.shape), cfg.train.seed, k, idx, rng.Stream.EPS)
    tb = t[:, None, None, None]
    with torch.no_grad():
        v = potential((1 - tb) * x0 + tb * x1 + cfg.bridge.sigma * torch.sqrt(tb * (1 - tb)) * eps, t)
    seen = spy_weights(monkeypatch)
    diag = agm(idx, x1, k)
    w = torch.cat(seen)
    assert w.shape == (B,)
    if scheme == "uniform":
        assert torch.equal(w, torch.ones(B))
        assert diag["ess"].item() == pytest.approx(B) and diag["w_min"].item() == diag["w_max"].item() == 1.0
        return
    assert v.std().item() > 0.1  # the trained V spreads the batch: the test is not vacuous
    # pairwise: lower V ⇒ larger w (coherent) or smaller w (degenerate); ties only from the clamp
    lower = v[:, None] < v[None, :] - 1e-4
    heavier = w[:, None] - w[None, :]
    sign = 1.0 if favour == "coherent" else -1.0
    assert bool((sign * heavier[lower] >= -1e-6).all())
    assert sign * (w[v.argmin()] - w[v.argmax()]).item() > 0.5
    assert w.sum().item() == pytest.approx(B, rel=1e-5)
    assert diag["ess"].item() < B - 0.5


# ----------------------------------------------------------------------------- the non-finite guard

def snapshot(drift, potential, ema, opt_f, opt_v):
    return {"params": [p.detach().clone() for n in (drift, potential, ema) for p in n.parameters()],
            "buffers": [b.clone() for b in ema.buffers()],
            "state": [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                      for opt, net in ((opt_f, drift), (opt_v, potential)) for p in net.parameters()],
            "lr": [opt_f.param_groups[0]["lr"], opt_v.param_groups[0]["lr"]]}


def assert_same(a, b, keys=("params", "buffers")):
    assert a["lr"] == b["lr"]
    for key in keys:
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key
    for sa, sb in zip(a["state"], b["state"], strict=True):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)


def test_a_nan_step_changes_nothing_and_the_run_continues_as_if_it_were_skipped():
    cfg = make_cfg("model.predicts=drift", "optim.weight_decay=0.1")
    shape, B = (1, 4, 4), cfg.train.batch_size

    def setup():
        torch.manual_seed(0)
        drift, potential = MLPDrift(shape), MLPPotential(shape)
        return (drift, potential, *build(cfg, drift, potential))

    g = torch.Generator().manual_seed(4)
    batches = [torch.rand((B, *shape), generator=g) * 2 - 1 for _ in range(3)]
    idx = [torch.arange(B, dtype=torch.int64) + k * B for k in range(3)]

    drift, potential, ema, opt_f, opt_v, agm = setup()
    assert bool(agm(idx[0], batches[0], 0)["finite"])
    before = snapshot(drift, potential, ema, opt_f, opt_v)
    bad = batches[1].clone()
    bad[3, 0, 1, 2] = float("nan")
    diag = agm(idx[1], bad, 1)
    assert not bool(diag["finite"])
    assert math.isnan(diag["loss_v"].item())
    assert_same(snapshot(drift, potential, ema, opt_f, opt_v), before)
    assert all(p.grad is None for net in (drift, potential) for p in net.parameters())  # gradients dropped
    assert bool(agm(idx[2], batches[2], 2)["finite"])

    # a run that never saw step 1 ends with the same weights, EMA and Adam state, bit for bit
    # (not the same buffers: MLPDrift's image counter did see the NaN batch's forward)
    d2, p2, e2, of2, ov2, agm2 = setup()
    agm2(idx[0], batches[0], 0)
    agm2(idx[2], batches[2], 2)
    assert_same(snapshot(drift, potential, ema, opt_f, opt_v), snapshot(d2, p2, e2, of2, ov2), keys=("params",))
