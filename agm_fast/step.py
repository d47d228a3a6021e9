"""One AGM iteration (docs/design.md §1 "one iteration") as one object: AGMStep.

    step = AGMStep(cfg, drift, potential, ema, opt_f, opt_v, device=..., kernels=..., autocast_dtype=...,
                   dist=None)        # or this rank's agm_fast.distributed.Dist under torchrun
    diag = step(indices, x1, k)      # global sample indices [b] int64 and x1 [b, C, H, W] on the device;
                                     # b = train.batch_size / world size

  1. t ~ U[t_min, 1 - t_eps]; x_t⁺ = bridge(x1), x_t⁻ = bridge(negatives(x1)), same t, x0, ε
  2. V(x_t⁺), V(x_t⁻) for every micro-batch first; L_V (paper Eq. 10) → gradients of φ
  3. w from sg[V(x_t⁺)] of the whole optimiser batch; L_f (paper Eq. 13) → gradients of θ
  4. non-finite guard; grad-norm clipping per net; one AdamW step of θ and one of φ with the
     scheduled learning rates; EMA of θ
All noise is keyed by (seed, k, global sample index, stream), so the step is a pure function of
its inputs and the state of the nets and optimisers: a resumed run repeats the uninterrupted one.

Under torchrun (`dist` given, agm_fast.distributed) x1 is this rank's contiguous slice of the
global batch; both nets run inside DistributedDataParallel (gradients averaged over ranks, no_sync
for all but the last micro-batch); V(x_t⁺) of every rank is all-gathered, so the weights are those
of the global optimiser batch, exactly as one process with the same global batch computes them;
the guard decides on every rank's losses and grad norms, so all ranks skip or step together; the
diagnostics describe the global batch. Without `dist` the step runs no collective.

The trainer's loop, the step benchmark and (later) torch.compile / CUDA-graph capture call this
same object, so what is benchmarked is what trains. Its diagnostics come back as device tensors;
`diagnostics_row` reads them in one transfer. The one host read inside the step is the guard's:
skipping an optimiser step needs to know, on the host, that the step is not finite.
"""

from __future__ import annotations

import math

import torch

from . import bridge, dispatch, distributed
from .config import Config

T_BINS = 4  # mean importance weight per t-bin: [0, .25), [.25, .5), [.5, .75), [.75, 1)
SCALARS = ("loss_f", "loss_v", "grad_norm_f", "grad_norm_v", "ess", "w_min", "w_max", "v_gap",
           "hinge_active", "mse_unweighted")


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up (step+1)/warmup_steps to 1, then constant or cosine decay to 0 at train.steps."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(1, cfg.train.steps - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - o.warmup_steps) / span)))
    return 1.0


def ema_beta(cfg: Config) -> float:
    """Per-step EMA decay from the half-life in images (EDM): β^(batch/halflife) = 1/2."""
    h = cfg.ema.halflife_kimg * 1000
    return 0.5 ** (cfg.train.batch_size / h) if h > 0 else 0.0


class _PotentialPair(torch.nn.Module):
    """V(x_t⁺) and V(x_t⁻) as one forward, so that DistributedDataParallel sees one forward per
    backward (the same two calls of the potential, in the same order)."""

    def __init__(self, potential: torch.nn.Module):
        super().__init__()
        self.potential = potential

    def forward(self, x_pos, x_neg, t):
        return self.potential(x_pos, t), self.potential(x_neg, t)


class AGMStep:
    """One optimiser step of f_θ and V_φ on a batch (module docstring). Holds no state of its
    own: everything that changes lives in the nets, the EMA copy and the optimisers. `dist`
    (agm_fast.distributed.Dist, None for one process) makes it one rank's part of a DDP step."""

    def __init__(self, cfg: Config, drift: torch.nn.Module, potential: torch.nn.Module, ema: torch.nn.Module,
                 opt_f: torch.optim.Optimizer, opt_v: torch.optim.Optimizer, *, device: torch.device,
                 kernels: str, autocast_dtype: torch.dtype | None, dist: distributed.Dist | None = None):
        self.cfg, self.drift, self.potential, self.ema = cfg, drift, potential, ema
        self.opt_f, self.opt_v = opt_f, opt_v
        self.device, self.kernels, self.autocast_dtype = device, kernels, autocast_dtype
        self.dist = dist
        self.rank, self.world = distributed.rank_world(dist)
        self.batch = cfg.train.batch_size  # the global optimiser batch
        self.per_rank, self.micro = distributed.per_rank_batch(self.batch, cfg.train.micro_batch, self.world)
        self.beta = ema_beta(cfg)
        self.ema_params, self.drift_params = list(ema.parameters()), list(drift.parameters())
        # forward passes go through DDP under a process group; parameters, clipping and the
        # optimisers always see the plain modules
        self._drift = distributed.wrap(drift, dist)
        self._pair = distributed.wrap(_PotentialPair(potential), dist) if dist is not None else None

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, indices: torch.Tensor, x1: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        seed, sigma = cfg.train.seed, cfg.bridge.sigma
        # dropout: keyed by step (and rank), so resume is exact
        torch.manual_seed((seed * 1_000_003 + step + self.rank * 0x9E3779B97F4A7C15) % 2**63)
        t = bridge.sample_t(seed, step, indices, cfg.bridge.t_min, cfg.bridge.t_eps, self.device)
        keys = dict(seed=seed, step=step, sample_index=indices, sigma=sigma)
        x_pos = dispatch.bridge_sample(self.kernels, x1, t, **keys)
        x1_neg = bridge.negatives(x1, cfg.potential.negatives, seed, step, indices, cfg.potential.patch)
        x_neg = dispatch.bridge_sample(self.kernels, x1_neg, t, **keys)
        b = x1.shape[0]  # this rank's batch: all of it for one process
        chunks = [slice(o, o + self.micro) for o in range(0, b, self.micro)]

        # V_φ first, for every micro-batch (paper Eq. 10); its sg-scores weight the whole batch.
        self.opt_v.zero_grad(set_to_none=True)
        v_pos, v_neg, loss_v = [], [], torch.zeros((), device=self.device)
        for i, c in enumerate(chunks):
            with distributed.no_sync(self._pair, last=i == len(chunks) - 1):
                with self._autocast():
                    if self._pair is None:
                        vp = self.potential(x_pos[c], t[c]).float()
                        vn = self.potential(x_neg[c], t[c]).float()
                    else:
                        vp, vn = (v.float() for v in self._pair(x_pos[c], x_neg[c], t[c]))
                lv = bridge.potential_hinge_loss(vp, vn, cfg.potential.margin) * (vp.shape[0] / b)
                lv.backward()
            loss_v += lv.detach()
            v_pos.append(vp.detach())
            v_neg.append(vn.detach())
        v_pos, v_neg = torch.cat(v_pos), torch.cat(v_neg)
        # the global batch's V⁺ (and V⁻, t for the diagnostics): rank r's samples sit at
        # [r·per_rank, (r+1)·per_rank), as the loader slices the global batch
        v_all, t_all, offset = v_pos, t, 0
        if self.dist is not None:
            gathered = self.dist.all_gather(torch.stack([v_pos, v_neg, t.float()]))  # [world, 3, b]
            v_all, t_all, offset = gathered[:, 0].reshape(-1), gathered[:, 2].reshape(-1), self.rank * b

        # f_θ: importance-weighted bridge matching (paper Eq. 13); L_f never reaches φ.
        self.opt_f.zero_grad(set_to_none=True)
        w = cfg.weights
        loss_f, per_sample, weights = torch.zeros((), device=self.device), [], []
        for i, c in enumerate(chunks):
            with distributed.no_sync(self._drift, last=i == len(chunks) - 1):
                with self._autocast():
                    pred = self._drift(x_pos[c], t[c])
                out = dispatch.weighted_bridge_loss(
                    self.kernels, pred, x1[c], t[c], v_all, seed=seed, step=step, sample_index=indices[c],
                    sigma=sigma, predicts=cfg.model.predicts, scheme=w.scheme, favour=w.favour, tau=w.tau,
                    clip=w.clip, normalise=w.normalise, t_bins=w.t_bins, t_all=t_all,
                    v_offset=offset + c.start, normalizer=b)
                out.loss.backward()
            loss_f += out.loss.detach()
            per_sample.append(out.per_sample)
            weights.append(out.weights)
        per_sample, weights = torch.cat(per_sample), torch.cat(weights)

        # under DDP the gradients are the global batch's here (averaged in the last backward)
        clip = cfg.optim.grad_clip or float("inf")
        gn_f = torch.nn.utils.clip_grad_norm_(self.drift.parameters(), clip)
        gn_v = torch.nn.utils.clip_grad_norm_(self.potential.parameters(), clip)
        if self.dist is not None:  # global losses and per-sample values, the same on every rank
            loss_f, loss_v, gn_f, gn_v, weights, per_sample, rank_norms = self._gather_after_backward(
                loss_f, loss_v, gn_f, gn_v, weights, per_sample)
            v_pos, v_neg, t = gathered[:, 0].reshape(-1), gathered[:, 1].reshape(-1), gathered[:, 2].reshape(-1)
            finite = torch.cat([torch.stack([loss_f, loss_v]), rank_norms]).isfinite().all()
        else:
            finite = torch.stack([loss_f, loss_v, gn_f, gn_v]).isfinite().all()
        if finite.item():  # the guard: a non-finite step changes nothing (no optimiser step, no EMA)
            self._update(step)
        else:
            self.opt_f.zero_grad(set_to_none=True)
            self.opt_v.zero_grad(set_to_none=True)
        return self._diagnostics(loss_f, loss_v, gn_f, gn_v, t, v_pos, v_neg, weights, per_sample, finite)

    def _gather_after_backward(self, loss_f, loss_v, gn_f, gn_v, weights, per_sample):
        """One all-gather of every rank's [L_f, L_V, |g_f|, |g_v|, w…, mse…]. Each rank's losses are
        means over its own samples (normalised by the per-rank batch), so the global batch's are
        their mean over ranks. The grad norms are of the all-reduced gradients, equal on every
        rank; all of them enter the guard, so that every rank takes the same decision."""
        b = weights.shape[0]
        mine = torch.cat([torch.stack([loss_f, loss_v, gn_f, gn_v]).float(), weights.float(), per_sample.float()])
        g = self.dist.all_gather(mine)  # [world, 4 + 2b]
        norms = g[:, 2:4].reshape(-1)
        return (g[:, 0].mean(), g[:, 1].mean(), g[0, 2], g[0, 3], g[:, 4:4 + b].reshape(-1),
                g[:, 4 + b:].reshape(-1), norms)

    def _update(self, step: int) -> None:
        f = lr_factor(step, self.cfg)
        for opt, lr in ((self.opt_f, self.cfg.optim.lr), (self.opt_v, self.cfg.optim.lr_potential)):
            for g in opt.param_groups:
                g["lr"] = lr * f
        self.opt_f.step()
        self.opt_v.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.drift_params, 1 - self.beta)
            for be, b in zip(self.ema.buffers(), self.drift.buffers()):
                be.copy_(b)

    def _diagnostics(self, loss_f, loss_v, gn_f, gn_v, t, v_pos, v_neg, w, per_sample, finite) -> dict:
        """docs/design.md §1 "Diagnostics", as device tensors (no host sync)."""
        bins = torch.clamp((t * T_BINS).long(), max=T_BINS - 1)
        in_bin = bins[None, :] == torch.arange(T_BINS, device=t.device)[:, None]
        values = [loss_f, loss_v, gn_f, gn_v, bridge.effective_sample_size(w), w.min(), w.max(),
                  (v_neg - v_pos).mean(), (self.cfg.potential.margin + v_pos - v_neg > 0).float().mean(),
                  per_sample.mean()]
        out = dict(zip(SCALARS, values))
        out["w_per_t_bin"] = (in_bin * w).sum(1) / in_bin.sum(1)  # NaN for an empty bin
        out["finite"] = finite
        return out


def diagnostics_row(step: int, diag: dict[str, torch.Tensor], cfg: Config) -> dict:
    """The step's diagnostics as one metrics.jsonl row, read from the device in one transfer."""
    values = torch.cat([torch.stack([diag[k].float() for k in SCALARS]), diag["w_per_t_bin"].float(),
                        diag["finite"].float().reshape(1)]).tolist()
    row = {"step": step, **dict(zip(SCALARS, values))}
    row["w_per_t_bin"] = [None if math.isnan(x) else x for x in values[len(SCALARS):-1]]
    row["lr"] = cfg.optim.lr * lr_factor(step, cfg)
    row["finite"] = bool(values[-1])
    return row
