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

The trainer's loop, the step benchmark and the fast paths below call this same object, so what
is benchmarked is what trains. Its diagnostics come back as device tensors; `diagnostics_row`
reads them in one transfer. The guard reads one flag on the host (skipping an optimiser step
needs to know that the step is not finite); nothing else in the step reads the device.

Fast paths (docs/design.md §3; each checked against the eager step by tests/test_step_fast.py):
  optim.impl      `build_optimisers`: torch AdamW as for_loop, foreach or fused; auto = fused on
                  CUDA, for_loop on the CPU (what torch's default picks there: the same numbers).
                  `set_adamw_impl` re-applies the choice after a checkpoint load (the saved
                  param groups carry the writer's flags; the state tensors are the same format).
  train.compile   nets: torch.compile of the drift and potential forwards (attention backend and
                  fused norm resolved first). step: torch.compile of `_forward`, the whole
                  iteration's forward half (t, bridges, negatives, V⁺/V⁻, hinge loss, weights,
                  drift loss) over the whole per-rank batch; one backward of L_V + L_f (L_f never
                  reaches φ, L_V never θ: the same gradients) and the optimiser stay eager. The
                  step word enters as a 0-dim int64 device tensor, so one graph serves every step;
                  the seed is a per-run constant and is baked in. Refused on the CPU (inductor's
                  C++ code for the Philox noise is wrong there, STEP_BACKEND), with
                  train.kernels=triton (their step word is a host int), with micro-batches and
                  under torchrun.
  train.cuda_graph  `GraphedAGMStep`: the whole iteration (forwards, backwards, clipping, fused
                  AdamW, EMA) on static buffers (x1, indices, step word, learning rates), with the
                  guard decided on the device (fused AdamW's found_inf, EMA masked by torch.where).
                  Captured once on CUDA; elsewhere the same body runs eagerly on the same buffers,
                  which is how the CPU tests check it against this step. check_cuda_graph lists
                  what it refuses (CPU, torchrun, compile=step, triton kernels, non-fused AdamW,
                  dropout). The capture is not yet verified on a GPU (the body has no host read
                  or host→device copy: Philox keys are Python ints, the weights' all-equal case
                  is a torch.where).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

from . import bridge, dispatch, distributed
from .config import Config, ConfigError, check_choice

log = logging.getLogger("agm_fast")

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


# ----------------------------------------------------------------------------- optim.impl

_ADAMW_FLAGS = {"for_loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False),
                "fused": dict(foreach=False, fused=True)}


def resolve_adamw_impl(requested: str, device: torch.device) -> tuple[str, str]:
    """optim.impl → (for_loop | foreach | fused, why). auto: fused on CUDA (one kernel for all
    tensors), for_loop elsewhere: what torch's default picks for CPU tensors, so the CPU numbers
    of runs from before the switch do not change."""
    check_choice("optim.impl", requested)
    if requested != "auto":
        return requested, "requested"
    if torch.device(device).type == "cuda":
        return "fused", "auto: fused on CUDA"
    return "for_loop", f"auto: for_loop on {torch.device(device).type} (torch's default there)"


def build_optimisers(cfg: Config, drift: torch.nn.Module, potential: torch.nn.Module, impl: str, *,
                     capturable: bool = False) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """AdamW of θ and of φ with the resolved optim.impl. capturable: the step count and the
    bias corrections stay on the device (CUDA-graph capture; CUDA only)."""
    o = cfg.optim
    kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay, capturable=capturable, **_ADAMW_FLAGS[impl])
    return (torch.optim.AdamW(drift.parameters(), lr=o.lr, **kw),
            torch.optim.AdamW(potential.parameters(), lr=o.lr_potential, **kw))


def set_adamw_impl(opt: torch.optim.Optimizer, impl: str, *, capturable: bool = False) -> None:
    """Re-apply the implementation after opt.load_state_dict: the loaded param groups carry the
    flags of the optimiser that wrote the checkpoint, and its `step` counters sit where that one
    kept them (on the CPU for for_loop/foreach, on the parameter's device for fused/capturable).
    The moments are the same tensors for every implementation."""
    for group in opt.param_groups:
        group.update(capturable=capturable, **_ADAMW_FLAGS[impl])
        for p in group["params"]:
            st = opt.state.get(p)
            if st and "step" in st:
                on_device = impl == "fused" or capturable
                st["step"] = st["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu")


# ----------------------------------------------------------------------------- the step

class _PotentialPair(torch.nn.Module):
    """V(x_t⁺) and V(x_t⁻) as one forward, so that DistributedDataParallel sees one forward per
    backward (the same two calls of the potential, in the same order)."""

    def __init__(self, potential: torch.nn.Module):
        super().__init__()
        self.potential = potential

    def forward(self, x_pos, x_neg, t):
        return self.potential(x_pos, t), self.potential(x_neg, t)


# torch.compile's backend for train.compile=step. Inductor's CPU (C++) code for agm_fast.rng's
# Philox rounds returns other words than eager (torch 2.13, measured: rng.philox4x32 under
# torch.compile(fullgraph=True) on 6 CPU indices), so the keyed noise would be wrong; aot_eager
# (tracing and autograd, no code generation) draws it right. tests/test_step_fast.py checks the step
# mode's tracing with aot_eager on the CPU and with inductor on CUDA.
STEP_BACKEND = "inductor"


def check_compile(cfg: Config, kernels: str, dist, device: torch.device) -> str:
    """train.compile, with the combinations it cannot serve refused (ConfigError naming the fields)."""
    mode = check_choice("train.compile", cfg.train.compile)
    if mode != "step":
        return mode
    if kernels == "triton":
        raise ConfigError("train.compile=step cannot trace train.kernels=triton: the Triton kernels take the step "
                          "word as a host integer, so every step would compile a new graph; use train.kernels=torch "
                          "or train.compile=nets")
    if dist is not None:
        raise ConfigError("train.compile=step runs one process only (under torchrun use train.compile=nets: "
                          "DistributedDataParallel needs its own forward per backward)")
    if cfg.train.micro_batch and cfg.train.micro_batch < cfg.train.batch_size:
        raise ConfigError(f"train.compile=step runs the whole batch's forward in one piece, so "
                          f"train.micro_batch={cfg.train.micro_batch} would save no memory; use train.compile=nets "
                          "with micro-batches")
    if torch.device(device).type == "cpu" and STEP_BACKEND == "inductor":
        raise ConfigError("train.compile=step is refused on the CPU: inductor's C++ code for the Philox noise "
                          "(agm_fast.rng) differs from eager on torch 2.13, so the keyed noise would be wrong; use "
                          "train.compile=nets (the nets hold no noise) or a CUDA device")
    return mode


class AGMStep:
    """One optimiser step of f_θ and V_φ on a batch (module docstring). Holds no state of its
    own: everything that changes lives in the nets, the EMA copy and the optimisers. `dist`
    (agm_fast.distributed.Dist, None for one process) makes it one rank's part of a DDP step.
    cfg.train.compile (off | nets | step) picks the compiled parts."""

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
        self._potential = potential
        self.compile = check_compile(cfg, kernels, dist, device)
        self.compile_seconds: float | None = None  # the first call's time when compiling (compile + one step)
        self._forward_fn = None
        if self.compile != "off":
            for net in (drift, potential):  # probes and log lines do not trace: resolve them now
                for resolve in ("resolve_attention_backend", "resolve_norm_impl"):
                    if hasattr(net, resolve):
                        getattr(net, resolve)(device)
        if self.compile == "nets":
            self._drift = torch.compile(self._drift)
            if self._pair is not None:
                self._pair = torch.compile(self._pair)
            else:
                self._potential = torch.compile(potential)
        elif self.compile == "step":
            self._forward_fn = torch.compile(self._forward, backend=STEP_BACKEND)
            # the step word as a device tensor: one graph for every step (a Python int would be
            # specialised, i.e. a recompile at the next step)
            self._step_word = torch.zeros((), dtype=torch.int64, device=device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def seed_dropout(self, step: int) -> None:
        """Dropout noise keyed by step (and rank), so that resume is exact."""
        torch.manual_seed((self.cfg.train.seed * 1_000_003 + step + self.rank * 0x9E3779B97F4A7C15) % 2**63)

    # --- the pieces of the forward half; `step` is the Philox step word, an int or a 0-dim int64 device tensor
    def _layout(self, x1):
        """x1 in the drift net's layout (model.channels_last: NHWC), so the bridge samples, the net
        and the loss all keep it: one conversion of the batch instead of one per op."""
        return x1.contiguous(memory_format=torch.channels_last) if self.cfg.model.channels_last and x1.dim() == 4 else x1

    def _bridges(self, indices, x1, step):
        """t, x_t⁺ and x_t⁻ (same t, x0, ε)."""
        cfg, seed = self.cfg, self.cfg.train.seed
        t = bridge.sample_t(seed, step, indices, cfg.bridge.t_min, cfg.bridge.t_eps, self.device)
        keys = dict(seed=seed, step=step, sample_index=indices, sigma=cfg.bridge.sigma)
        x_pos = dispatch.bridge_sample(self.kernels, x1, t, **keys)
        x1_neg = bridge.negatives(x1, cfg.potential.negatives, seed, step, indices, cfg.potential.patch)
        x_neg = dispatch.bridge_sample(self.kernels, x1_neg, t, **keys)
        return t, x_pos, x_neg

    def _potential_loss(self, x_pos, x_neg, t, b):
        """V⁺, V⁻ (fp32) and this chunk's share of L_V (paper Eq. 10)."""
        with self._autocast():
            if self._pair is None:
                vp, vn = self._potential(x_pos, t).float(), self._potential(x_neg, t).float()
            else:
                vp, vn = (v.float() for v in self._pair(x_pos, x_neg, t))
        return vp, vn, bridge.potential_hinge_loss(vp, vn, self.cfg.potential.margin) * (vp.shape[0] / b)

    def _drift_loss(self, x_pos, x1, t, indices, step, v_all, t_all, offset, b):
        """This chunk's share of L_f (paper Eq. 13), weighted from the whole batch's sg[V⁺]."""
        cfg, w = self.cfg, self.cfg.weights
        with self._autocast():
            pred = self._drift(x_pos, t)
        return dispatch.weighted_bridge_loss(
            self.kernels, pred, x1, t, v_all, seed=cfg.train.seed, step=step, sample_index=indices,
            sigma=cfg.bridge.sigma, predicts=cfg.model.predicts, scheme=w.scheme, favour=w.favour, tau=w.tau,
            clip=w.clip, normalise=w.normalise, t_bins=w.t_bins, t_all=t_all, v_offset=offset, normalizer=b)

    def _forward(self, indices, x1, step):
        """The forward half over the whole per-rank batch in one piece (train.compile=step traces
        this): returns L_V, L_f (differentiable) and the diagnostics' inputs."""
        b, x1 = x1.shape[0], self._layout(x1)
        t, x_pos, x_neg = self._bridges(indices, x1, step)
        v_pos, v_neg, loss_v = self._potential_loss(x_pos, x_neg, t, b)
        out = self._drift_loss(x_pos, x1, t, indices, step, v_pos.detach(), t, 0, b)
        return loss_v, out.loss, t, v_pos.detach(), v_neg.detach(), out.weights, out.per_sample

    def _forward_backward(self, indices, x1, step):
        """Both losses and their gradients, micro-batch by micro-batch (V_φ first for every
        micro-batch: its sg-scores weight the whole batch)."""
        b, x1 = x1.shape[0], self._layout(x1)  # this rank's batch: all of it for one process
        chunks = [slice(o, o + self.micro) for o in range(0, b, self.micro)]
        t, x_pos, x_neg = self._bridges(indices, x1, step)
        self.opt_v.zero_grad(set_to_none=True)
        v_pos, v_neg, loss_v = [], [], torch.zeros((), device=self.device)
        for i, c in enumerate(chunks):
            with distributed.no_sync(self._pair, last=i == len(chunks) - 1):
                vp, vn, lv = self._potential_loss(x_pos[c], x_neg[c], t[c], b)
                lv.backward()
            loss_v += lv.detach()
            v_pos.append(vp.detach())
            v_neg.append(vn.detach())
        v_pos, v_neg = torch.cat(v_pos), torch.cat(v_neg)
        # the global batch's V⁺ (and V⁻, t for the diagnostics): rank r's samples sit at
        # [r·per_rank, (r+1)·per_rank), as the loader slices the global batch
        v_all, t_all, offset, gathered = v_pos, t, 0, None
        if self.dist is not None:
            gathered = self.dist.all_gather(torch.stack([v_pos, v_neg, t.float()]))  # [world, 3, b]
            v_all, t_all, offset = gathered[:, 0].reshape(-1), gathered[:, 2].reshape(-1), self.rank * b

        # f_θ: importance-weighted bridge matching; L_f never reaches φ.
        self.opt_f.zero_grad(set_to_none=True)
        loss_f, per_sample, weights = torch.zeros((), device=self.device), [], []
        for i, c in enumerate(chunks):
            with distributed.no_sync(self._drift, last=i == len(chunks) - 1):
                out = self._drift_loss(x_pos[c], x1[c], t[c], indices[c], step, v_all, t_all, offset + c.start, b)
                out.loss.backward()
            loss_f += out.loss.detach()
            per_sample.append(out.per_sample)
            weights.append(out.weights)
        return loss_v, loss_f, t, v_pos, v_neg, torch.cat(weights), torch.cat(per_sample), gathered

    def _gradients(self, indices, x1, step):
        """(L_V, L_f, t, V⁺, V⁻, w, mse per sample, gathered or None) with the gradients in .grad."""
        if self._forward_fn is None:
            return self._forward_backward(indices, x1, step)
        if not isinstance(step, torch.Tensor):
            self._step_word.fill_(step)
            step = self._step_word
        # at the graph breaks (the host checks of agm_fast.checks on CPU tensors) an output that is a view of a view is rebuilt with as_strided:
        # aot_autograd's view replay fails on them (IndexError in gen_alias_from_base, torch 2.13)
        with torch._functorch.config.patch(view_replay_for_aliased_outputs=False):
            loss_v, loss_f, *rest = self._forward_fn(indices, x1, step)
        self.opt_v.zero_grad(set_to_none=True)
        self.opt_f.zero_grad(set_to_none=True)
        (loss_v + loss_f).backward()
        return (loss_v.detach(), loss_f.detach(), *rest, None)

    def __call__(self, indices: torch.Tensor, x1: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        first = self.compile != "off" and self.compile_seconds is None
        t0 = time.perf_counter() if first else 0.0
        self.seed_dropout(step)
        loss_v, loss_f, t, v_pos, v_neg, weights, per_sample, gathered = self._gradients(indices, x1, step)
        gn_f, gn_v = self._clip()
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
        if first:
            self.compile_seconds = time.perf_counter() - t0
            log.info("train.compile=%s: first step (compilation included) %.1f s", self.compile, self.compile_seconds)
        return self._diagnostics(loss_f, loss_v, gn_f, gn_v, t, v_pos, v_neg, weights, per_sample, finite)

    def _clip(self):
        # under DDP the gradients are the global batch's here (averaged in the last backward)
        clip = self.cfg.optim.grad_clip or float("inf")
        return (torch.nn.utils.clip_grad_norm_(self.drift.parameters(), clip),
                torch.nn.utils.clip_grad_norm_(self.potential.parameters(), clip))

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

    def set_lr(self, step: int) -> None:
        """The scheduled learning rates into both optimisers' param groups (a device tensor's
        value in place when the group holds one: the CUDA-graph step reads it from there)."""
        f = lr_factor(step, self.cfg)
        for opt, lr in ((self.opt_f, self.cfg.optim.lr), (self.opt_v, self.cfg.optim.lr_potential)):
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(lr * f)
                else:
                    g["lr"] = lr * f

    def _update(self, step: int) -> None:
        self.set_lr(step)
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


# ----------------------------------------------------------------------------- train.cuda_graph

def check_cuda_graph(cfg: Config, device: torch.device, kernels: str, optim_impl: str, dist) -> None:
    """train.cuda_graph=true: the combinations that can be captured, else a ConfigError saying why."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device; train.device resolved to {device}")
    if dist is not None:
        raise ConfigError("train.cuda_graph=true runs one process only: DistributedDataParallel's gradient "
                          "buckets and collectives are not captured here")
    if cfg.train.compile == "step":
        raise ConfigError("train.cuda_graph=true does not combine with train.compile=step (use train.compile=nets "
                          "or off)")
    if kernels == "triton":
        raise ConfigError("train.cuda_graph=true cannot capture train.kernels=triton yet: the Triton kernels take "
                          "the step word as a host integer, which a graph would freeze at its capture value; "
                          "use train.kernels=torch")
    if optim_impl != "fused":
        raise ConfigError(f"train.cuda_graph=true needs optim.impl=fused (or auto): the skip of a non-finite step "
                          f"is fused AdamW's found_inf; optim.impl resolved to {optim_impl}")
    if cfg.model.dropout > 0:
        raise ConfigError("train.cuda_graph=true needs model.dropout=0: dropout noise is keyed per step by a host "
                          "reseed, which a graph cannot repeat")


class GraphedAGMStep:
    """The whole AGM iteration on static buffers (train.cuda_graph): x1, indices and the step word
    are copied into them before each call; the learning rates are device tensors in the param
    groups (set before each call); the guard is decided on the device: fused AdamW skips its
    update when found_inf = 1 (and keeps the step count), the EMA and its buffers take
    torch.where(finite, new, old). On CUDA the body is captured once as a CUDA graph and
    replayed; elsewhere the same body runs eagerly on the same buffers (tests/test_step_fast.py
    checks it against AGMStep). Needs fused AdamW (capturable on CUDA) and one process
    (check_cuda_graph). Differences from AGMStep: gradients of a skipped step stay in .grad (the
    next step drops them), and no host read happens inside the step."""

    def __init__(self, step: AGMStep):
        for opt in (step.opt_f, step.opt_v):
            if not opt.defaults.get("fused"):
                raise ConfigError("train.cuda_graph=true needs optim.impl=fused")
        self.step, dev = step, step.device
        self.x1 = self.indices = None  # the static inputs, shaped by the first batch
        self.word = torch.zeros((), dtype=torch.int64, device=dev)
        self.skip = torch.zeros((), dtype=torch.float32, device=dev)
        for opt in (step.opt_f, step.opt_v):
            opt.found_inf = self.skip  # fused AdamW reads it: 1.0 skips the update on the device
            for g in opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=dev)
        self.graph = None
        self.out = None

    @contextlib.contextmanager
    def host_lr(self):
        """Learning rates as floats for the while of a checkpoint save (state.json is JSON)."""
        groups = [g for opt in (self.step.opt_f, self.step.opt_v) for g in opt.param_groups]
        tensors = [g["lr"] for g in groups]
        for g, t in zip(groups, tensors):
            g["lr"] = float(t)
        try:
            yield
        finally:
            for g, t in zip(groups, tensors):
                g["lr"] = t

    def _body(self) -> dict[str, torch.Tensor]:
        s = self.step
        loss_v, loss_f, t, v_pos, v_neg, weights, per_sample, _ = s._forward_backward(self.indices, self.x1, self.word)
        gn_f, gn_v = s._clip()
        finite = torch.stack([loss_f, loss_v, gn_f, gn_v]).isfinite().all()
        self.skip.copy_((~finite).float())
        s.opt_f.step()
        s.opt_v.step()
        with torch.no_grad():
            targets = [torch.where(finite, p, e) for p, e in zip(s.drift_params, s.ema_params)]
            torch._foreach_lerp_(s.ema_params, targets, 1 - s.beta)  # lerp(e, e, ·) = e: skipped steps keep it
            for be, b in zip(s.ema.buffers(), s.drift.buffers()):
                be.copy_(torch.where(finite, b, be))
        return s._diagnostics(loss_f, loss_v, gn_f, gn_v, t, v_pos, v_neg, weights, per_sample, finite)

    def _capture(self) -> None:
        dev = self.step.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture (lazy init, cuDNN plans, AdamW state)
            for _ in range(3):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._body()

    def __call__(self, indices: torch.Tensor, x1: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if self.x1 is None:
            self.x1 = torch.empty_like(x1, device=self.step.device)
            self.indices = torch.empty(x1.shape[0], dtype=torch.int64, device=self.step.device)
        elif x1.shape != self.x1.shape:
            raise ValueError(f"train.cuda_graph: a batch of shape {tuple(x1.shape)} after {tuple(self.x1.shape)} "
                             "(the captured step has static shapes)")
        self.x1.copy_(x1, non_blocking=True)
        self.indices.copy_(indices, non_blocking=True)
        self.word.fill_(step)
        self.step.set_lr(step)
        if self.step.device.type != "cuda":
            return self._body()
        if self.graph is None:
            # the warm-up steps train: capture on a copy of the state would double the memory, so
            # the nets and optimisers are restored from a snapshot after it
            snapshot = self._snapshot()
            t0 = time.perf_counter()
            self._capture()
            self._restore(snapshot)
            log.info("train.cuda_graph: captured the step in %.1f s", time.perf_counter() - t0)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()}

    def _snapshot(self):
        """The nets' tensors and the optimiser state before the warm-up steps of the capture."""
        s = self.step
        nets = [*s.drift.state_dict().values(), *s.potential.state_dict().values(), *s.ema.state_dict().values()]
        state = {id(p): [v for v in st.values() if isinstance(v, torch.Tensor)]
                 for opt in (s.opt_f, s.opt_v) for p, st in opt.state.items()}
        return [(t, t.detach().clone()) for t in nets + [v for vs in state.values() for v in vs]], set(state)

    def _restore(self, snapshot) -> None:
        saved, had_state = snapshot
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
            for opt in (self.step.opt_f, self.step.opt_v):  # state the warm-up created: AdamW's fresh zeros
                for p, st in opt.state.items():
                    if id(p) not in had_state:
                        for v in st.values():
                            if isinstance(v, torch.Tensor):
                                v.zero_()


def diagnostics_row(step: int, diag: dict[str, torch.Tensor], cfg: Config) -> dict:
    """The step's diagnostics as one metrics.jsonl row, read from the device in one transfer."""
    values = torch.cat([torch.stack([diag[k].float() for k in SCALARS]), diag["w_per_t_bin"].float(),
                        diag["finite"].float().reshape(1)]).tolist()
    row = {"step": step, **dict(zip(SCALARS, values))}
    row["w_per_t_bin"] = [None if math.isnan(x) else x for x in values[len(SCALARS):-1]]
    row["lr"] = cfg.optim.lr * lr_factor(step, cfg)
    row["finite"] = bool(values[-1])
    return row
