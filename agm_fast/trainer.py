"""The AGM trainer (DESIGN.md §1): drift U-Net f_θ by weighted bridge matching, potential V_φ
by the hinge-margin contrastive loss, EMA of θ for sampling.

One iteration (`Trainer.train_step`):
  1. t, x_t⁺ = bridge(x1), x_t⁻ = bridge(negatives(x1)) with the same t, x0, ε      (§1)
  2. V(x_t⁺), V(x_t⁻) for every micro-batch first; L_V (paper Eq. 10) → grads of φ
  3. w from sg[V(x_t⁺)] of the whole optimiser batch; L_f (paper Eq. 13) → grads of θ
  4. non-finite guard, grad clipping, one AdamW step of θ and one of φ, EMA of θ
All noise is keyed by (seed, step, global sample index, stream) and the data order by
(seed, global sample index), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import bridge, config as config_mod, dispatch
from .config import Config, ConfigError
from .files import atomic_write, atomic_write_text

log = logging.getLogger("agm_fast")

CKPT_PREFIX = "ckpt-"
T_BINS = 4  # mean importance weight per t-bin: [0, .25), [.25, .5), [.5, .75), [.75, 1)


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, bad checkpoint); the message says why and what is intact."""


class _Interrupted(BaseException):
    """SIGINT/SIGTERM after the final checkpoint. A BaseException so that no `except Exception`
    on the way (image loading, plotting) mistakes it for a failure of its own."""


# ----------------------------------------------------------------------------- small helpers

def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def drift_arch(cfg: Config) -> dict:
    m, d = cfg.model, cfg.data
    return dict(in_channels=d.channels, resolution=d.resolution, channels=m.channels,
                channel_mult=list(m.channel_mult), num_blocks=m.num_blocks,
                attn_resolutions=list(m.attn_resolutions), num_heads=m.num_heads,
                dropout=m.dropout, attention=m.attention, time_injection=m.time_injection)


def potential_arch(cfg: Config) -> dict:
    p, d = cfg.potential, cfg.data
    return dict(in_channels=d.channels, resolution=d.resolution, channels=list(p.channels),
                time_input=p.time_input, film_dim=p.film_dim)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up to 1, then constant or cosine decay to 0 at train.steps."""
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


def checkpoints(run_or_ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (a `.tmp` save killed before its
    rename is not one)."""
    d = Path(run_or_ckpt_dir)
    d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and not p.name.endswith(".tmp") and (p / "state.json").exists())


def newest_checkpoint(path) -> Path:
    """A run directory → its newest complete checkpoint directory; any other path as given."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        done = checkpoints(p)
        if not done:
            raise FileNotFoundError(f"{path}: run directory without a complete checkpoint")
        return done[-1]
    return p


# ----------------------------------------------------------------------------- optimiser state I/O
# Optimiser state goes to safetensors + JSON so that loading never unpickles anything.

def _optim_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optim(opt: torch.optim.Optimizer, prefix: str, tensors: dict, groups: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        p, idx, k = key.split(".", 2)
        if p == prefix:
            state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = True):
        from . import data, models  # noqa: F401  (imported here: heavy and optional parts)

        self.cfg = cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = dispatch.resolve_device(t.device, "train.device")
        self.rank, self.world = 0, 1
        self.run_dir = Path(t.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.per_rank_batch = t.batch_size // self.world
        self.micro = t.micro_batch or self.per_rank_batch
        if self.per_rank_batch % self.micro:
            raise ConfigError(f"train.micro_batch={t.micro_batch} must divide the per-rank batch {self.per_rank_batch}")
        if t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda"):
            self.autocast_dtype = torch.bfloat16
        else:
            self.autocast_dtype = None

        if t.sample_every or t.eval_images:  # fail now, not at the first sample grid
            from .sampler import time_grid
            try:
                time_grid(cfg.sample.steps, cfg.bridge.t_min, cfg.bridge.t_eps)
                em_impl, _ = dispatch.resolve("sample.em", cfg.sample.em, self.device)
            except ValueError as e:
                raise ConfigError(f"{e} (or set train.sample_every=0 and train.eval_images=0)") from None
            if cfg.sample.cuda_graph and (self.device.type != "cuda" or em_impl != "ext"):
                raise ConfigError(f"sample.cuda_graph=true needs a CUDA device and the fused op; here: "
                                  f"{self.device}, sample.em → {em_impl}")
        self.kernels_impl, why = dispatch.resolve("train.kernels", t.kernels, self.device)
        log.info("train.kernels: %s (%s)", self.kernels_impl, why)

        # data.num_images sizes the procedural set only: a folder is used whole (a cap of the
        # default 20000 would silently drop most of CelebA)
        self.dataset = data.make_dataset(cfg.data.dataset, path=cfg.data.path or None,
                                         resolution=cfg.data.resolution, channels=cfg.data.channels,
                                         num_images=cfg.data.num_images if cfg.data.dataset == "shapes" else None,
                                         seed=t.seed)
        log.info("dataset: %s, %d images", cfg.data.path if cfg.data.dataset == "folder" else "shapes",
                 len(self.dataset))
        torch.manual_seed(t.seed)
        self.drift = models.DriftUNet(**drift_arch(cfg)).to(self.device)
        self.potential = models.PotentialNet(**potential_arch(cfg)).to(self.device)
        self.drift.resolve_attention_backend(self.device)  # logs the backend and why
        self.ema = copy.deepcopy(self.drift).eval().requires_grad_(False)
        self.n_drift = models.count_parameters(self.drift)
        self.n_potential = models.count_parameters(self.potential)
        log.info("parameters: drift %s, potential %s (%.2f %% of drift)", f"{self.n_drift:,}",
                 f"{self.n_potential:,}", 100 * self.n_potential / self.n_drift)
        o = cfg.optim
        self.opt_f = torch.optim.AdamW(self.drift.parameters(), lr=o.lr, betas=tuple(o.betas),
                                       weight_decay=o.weight_decay)
        self.opt_v = torch.optim.AdamW(self.potential.parameters(), lr=o.lr_potential,
                                       betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.step = 0
        self.nonfinite = 0
        self.stop_signal: str | None = None
        self._finishing = False

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._set_aside_previous_run()
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            self.load_checkpoint(latest)
            log.info("resumed from %s at step %d", latest, self.step)
            if self.step > t.steps:
                log.warning("the checkpoint is past train.steps=%d: nothing to train (a new run needs another "
                            "train.run_dir or --no-resume)", t.steps)
        elif t.init_from:
            self.init_from(t.init_from)
        self._truncate_metrics()
        self._write_run_info()
        self.loader = data.BatchLoader(self.dataset, batch_size=self.per_rank_batch,
                                       global_batch=t.batch_size, rank_offset=self.rank * self.per_rank_batch,
                                       seed=t.seed, start_step=self.step, hflip=cfg.data.hflip,
                                       workers=cfg.data.workers, loader=cfg.data.loader,
                                       pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------ run bookkeeping
    def _write_run_info(self) -> None:
        atomic_write_text(self.run_dir / "config.json", config_mod.to_json(self.cfg) + "\n")
        info = {"git_commit": git_commit(), "versions": dispatch.package_versions(), "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "implementations": {"train.kernels": self.kernels_impl,
                                    "model.attention": getattr(self.drift, "attention_backend", None),
                                    "autocast": str(self.autocast_dtype)},
                "parameters": {"drift": self.n_drift, "potential": self.n_potential},
                "drift_arch": drift_arch(self.cfg), "potential_arch": potential_arch(self.cfg)}
        atomic_write_text(self.run_dir / "run_info.json", json.dumps(info, indent=1) + "\n")

    # what a run writes that a new run in the same directory would not all overwrite
    RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.json", "samples", "samples.png", "loss.png")

    def _set_aside_previous_run(self) -> None:
        """--no-resume: move the previous run's outputs into replaced-<time>/. Left in place, an
        older run's later checkpoints sort after the new run's, so keep_ckpts pruned the new
        ones and sampling or resuming picked up the old model."""
        old = [self.run_dir / name for name in self.RUN_OUTPUTS if (self.run_dir / name).exists()]
        if not old:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.run_dir / f"replaced-{stamp}", 1
        while dest.exists():
            n += 1
            dest = self.run_dir / f"replaced-{stamp}-{n}"
        dest.mkdir()
        for p in old:
            os.replace(p, dest / p.name)
        log.warning("--no-resume: moved the previous run's %s to %s", ", ".join(p.name for p in old), dest)

    def _check_weights_finite(self) -> None:
        """Refuse to checkpoint NaN/Inf weights: an update with finite gradients can still diverge
        (e.g. a far too large optim.lr with clipping off), and a checkpoint of it would be named the
        last good one. One device sync per save."""
        nets = {"drift": self.drift, "EMA drift": self.ema, "potential": self.potential}
        finite = torch.stack([torch.stack([p.detach().isfinite().all() for p in net.parameters()]).all()
                              for net in nets.values()]).tolist()
        bad = [name for name, ok in zip(nets, finite) if not ok]
        if bad:
            raise TrainingError(f"step {self.step}: the {' and '.join(bad)} weights hold NaN/Inf (training diverged; "
                                f"try a smaller optim.lr or optim.grad_clip > 0); not saved; last good checkpoint: "
                                f"{self.latest_checkpoint() or 'none'}")

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (a killed run may have logged beyond its checkpoint)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] < self.step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a kill: the metrics file is a log, not state
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        done = checkpoints(self.ckpt_dir)
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write ckpt-<step>/ into a temporary directory, then rename it into place (atomic)."""
        from .sampler import save_drift

        final = self.ckpt_dir / f"{CKPT_PREFIX}{self.step:08d}"
        if (final / "state.json").exists():
            # Already saved at this step (a stop right after a periodic save, or a rerun of a
            # finished run): the state is the same, and replacing it would open a window in which
            # a kill leaves no checkpoint at this step.
            return final
        self._check_weights_finite()
        tmp = self.ckpt_dir / (final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cfg_dict = config_mod.to_dict(self.cfg)
        meta = {"format": "agm_fast.checkpoint.v1", "step": str(self.step)}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.drift.state_dict().items()},
                  tmp / "drift.safetensors", metadata=meta)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.potential.state_dict().items()},
                  tmp / "potential.safetensors", metadata=meta)
        save_drift(tmp / "ema.safetensors", self.ema.state_dict(), drift_arch(self.cfg),
                   predicts=self.cfg.model.predicts, sigma=self.cfg.bridge.sigma, t_min=self.cfg.bridge.t_min,
                   t_eps=self.cfg.bridge.t_eps, config=cfg_dict, step=self.step)
        tf, gf = _optim_tensors("drift", self.opt_f)
        tv, gv = _optim_tensors("potential", self.opt_v)
        save_file({**tf, **tv}, tmp / "optim.safetensors", metadata=meta)
        state = {"format": "agm_fast.checkpoint.v1", "step": self.step, "nonfinite": self.nonfinite,
                 "seed": self.cfg.train.seed, "data_position": {"global_sample": self.step * self.cfg.train.batch_size},
                 "config": cfg_dict, "drift_arch": drift_arch(self.cfg), "potential_arch": potential_arch(self.cfg),
                 "optim_groups": {"drift": gf, "potential": gv}}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a directory without state.json: not a checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        for p in checkpoints(self.ckpt_dir)[: -self.cfg.train.keep_ckpts]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def _check_arch(self, source: Path, saved: dict, expected: dict, what: str) -> None:
        if saved != expected:
            diff = ", ".join(f"{k}: {saved.get(k)!r} there vs {expected.get(k)!r} here"
                             for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k))
            raise TrainingError(f"{source}: {what} architecture differs from this config ({diff})")

    def _read_state(self, ckpt: Path) -> dict:
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainingError(f"{ckpt}: not a readable agm_fast checkpoint ({e})") from None
        if state.get("format") != "agm_fast.checkpoint.v1":
            raise TrainingError(f"{ckpt}: unknown checkpoint format {state.get('format')!r}")
        return state

    def _load_tensors(self, path: Path, into: torch.nn.Module | None = None) -> dict:
        """safetensors → tensors on this device (optionally loaded into a module); any failure
        (missing, truncated or corrupt file, mismatched keys) is one TrainingError naming the file."""
        try:
            tensors = load_file(path, device=str(self.device))
            if into is not None:
                into.load_state_dict(tensors)
            return tensors
        except Exception as e:  # safetensors raises its own error type; torch a RuntimeError
            raise TrainingError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None

    def load_checkpoint(self, ckpt: Path) -> None:
        state = self._read_state(ckpt)
        try:
            try:
                self._check_arch(ckpt, state["drift_arch"], drift_arch(self.cfg), "drift net")
                self._check_arch(ckpt, state["potential_arch"], potential_arch(self.cfg), "potential net")
            except TrainingError as e:  # most often a new experiment pointed at an old run directory
                raise TrainingError(f"{e}; to start a new run, give another train.run_dir or --no-resume") from None
            self._load_tensors(ckpt / "drift.safetensors", self.drift)
            self._load_tensors(ckpt / "potential.safetensors", self.potential)
            self._load_tensors(ckpt / "ema.safetensors", self.ema)
            opt = self._load_tensors(ckpt / "optim.safetensors")
            _load_optim(self.opt_f, "drift", opt, state["optim_groups"]["drift"])
            _load_optim(self.opt_v, "potential", opt, state["optim_groups"]["potential"])
            self.step, self.nonfinite = state["step"], state["nonfinite"]
        except (KeyError, TypeError, ValueError) as e:  # a state.json or optimiser state that does not fit
            raise TrainingError(f"{ckpt}: damaged checkpoint ({type(e).__name__}: {e}); "
                                "delete it to resume from the one before") from None

    def init_from(self, source: str) -> None:
        """Fine-tuning start: weights (drift, EMA and, from a checkpoint dir, V_φ); fresh optimisers, step 0."""
        try:
            src = newest_checkpoint(source)
        except FileNotFoundError as e:
            raise TrainingError(f"train.init_from: {e}") from None
        if src.is_dir():
            state = self._read_state(src)
            self._check_arch(src, state.get("drift_arch", {}), drift_arch(self.cfg), "drift net")
            self._load_tensors(src / "drift.safetensors", self.drift)
            self._load_tensors(src / "ema.safetensors", self.ema)
            potential = state.get("potential_arch") == potential_arch(self.cfg)
            if potential:
                self._load_tensors(src / "potential.safetensors", self.potential)
        elif src.suffix == ".safetensors" and src.exists():
            from .sampler import load_drift
            net, meta = load_drift(src, device=self.device)
            self._check_arch(src, meta["drift_arch"], drift_arch(self.cfg), "drift net")  # parsed already
            self.drift.load_state_dict(net.state_dict())
            self.ema.load_state_dict(net.state_dict())
            potential = False
        else:
            raise TrainingError(f"train.init_from={source!r}: expected a run directory, a checkpoint "
                                "directory or an EMA .safetensors file")
        log.info("initialised weights from %s (%s)", src, "drift, EMA and V_φ" if potential else
                 "drift and EMA; V_φ starts fresh: " + ("an EMA file holds none" if src.is_file()
                                                        else "its architecture differs"))

    # ------------------------------------------------------------------ one iteration
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, indices: torch.Tensor, x1: torch.Tensor) -> dict:
        cfg, step = self.cfg, self.step
        seed, sigma = cfg.train.seed, cfg.bridge.sigma
        torch.manual_seed((seed * 1_000_003 + step) % 2**63)  # dropout: keyed by step, so resume is exact
        x1 = x1.to(self.device, non_blocking=True)
        indices = indices.to(self.device)
        t = bridge.sample_t(seed, step, indices, cfg.bridge.t_min, cfg.bridge.t_eps, self.device)
        keys = dict(seed=seed, step=step, sample_index=indices, sigma=sigma)
        x_pos = dispatch.bridge_sample(self.kernels_impl, x1, t, **keys)
        x1_neg = bridge.negatives(x1, cfg.potential.negatives, seed, step, indices, cfg.potential.patch)
        x_neg = dispatch.bridge_sample(self.kernels_impl, x1_neg, t, **keys)
        chunks = [slice(o, o + self.micro) for o in range(0, x1.shape[0], self.micro)]

        # V_φ first, for every micro-batch (paper Eq. 10); its sg-scores weight the whole batch.
        self.opt_v.zero_grad(set_to_none=True)
        v_pos, v_neg, loss_v = [], [], torch.zeros((), device=self.device)
        for c in chunks:
            with self._autocast():
                vp = self.potential(x_pos[c], t[c]).float()
                vn = self.potential(x_neg[c], t[c]).float()
            lv = bridge.potential_hinge_loss(vp, vn, cfg.potential.margin) * (vp.shape[0] / x1.shape[0])
            lv.backward()
            loss_v += lv.detach()
            v_pos.append(vp.detach())
            v_neg.append(vn.detach())
        v_pos, v_neg = torch.cat(v_pos), torch.cat(v_neg)
        v_all = v_pos  # single process: this rank's V is the whole batch's (DDP all-gathers here)

        # f_θ: importance-weighted bridge matching (paper Eq. 13); L_f never reaches φ.
        self.opt_f.zero_grad(set_to_none=True)
        loss_f, per_sample, weights = torch.zeros((), device=self.device), [], []
        for c in chunks:
            with self._autocast():
                pred = self.drift(x_pos[c], t[c])
            out = dispatch.weighted_bridge_loss(
                self.kernels_impl, pred, x1[c], t[c], v_all, seed=seed, step=step, sample_index=indices[c],
                sigma=sigma, predicts=cfg.model.predicts, scheme=cfg.weights.scheme, favour=cfg.weights.favour,
                tau=cfg.weights.tau, clip=cfg.weights.clip, v_offset=self.rank * self.per_rank_batch + c.start,
                normalizer=self.per_rank_batch)
            out.loss.backward()
            loss_f += out.loss.detach()
            per_sample.append(out.per_sample)
            weights.append(out.weights)
        per_sample, weights = torch.cat(per_sample), torch.cat(weights)

        clip = cfg.optim.grad_clip or float("inf")
        gn_f = torch.nn.utils.clip_grad_norm_(self.drift.parameters(), clip)
        gn_v = torch.nn.utils.clip_grad_norm_(self.potential.parameters(), clip)
        row = self._diagnostics(step, loss_f, loss_v, gn_f, gn_v, t, v_pos, v_neg, weights, per_sample)
        finite = all(math.isfinite(row[k]) for k in ("loss_f", "loss_v", "grad_norm_f", "grad_norm_v"))
        row["finite"] = finite
        if finite:
            f = lr_factor(step, cfg)
            for g in self.opt_f.param_groups:
                g["lr"] = cfg.optim.lr * f
            for g in self.opt_v.param_groups:
                g["lr"] = cfg.optim.lr_potential * f
            self.opt_f.step()
            self.opt_v.step()
            beta = ema_beta(cfg)
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.drift.parameters()), 1 - beta)
                for be, b in zip(self.ema.buffers(), self.drift.buffers()):
                    be.copy_(b)
        else:
            self.opt_f.zero_grad(set_to_none=True)
            self.opt_v.zero_grad(set_to_none=True)
        return row

    def _diagnostics(self, step, loss_f, loss_v, gn_f, gn_v, t, v_pos, v_neg, w, per_sample) -> dict:
        """The step's metrics (DESIGN.md §1 "Diagnostics"), read from the device in one transfer."""
        bins = torch.clamp((t * T_BINS).long(), max=T_BINS - 1)
        in_bin = bins[None, :] == torch.arange(T_BINS, device=t.device)[:, None]
        w_bin = (in_bin * w).sum(1) / in_bin.sum(1)  # NaN for an empty bin
        scalars = [loss_f, loss_v, gn_f, gn_v, bridge.effective_sample_size(w), w.min(), w.max(),
                   (v_neg - v_pos).mean(), (self.cfg.potential.margin + v_pos - v_neg > 0).float().mean(),
                   per_sample.mean()]
        values = torch.cat([torch.stack([s.float() for s in scalars]), w_bin.float()]).tolist()
        names = ("loss_f", "loss_v", "grad_norm_f", "grad_norm_v", "ess", "w_min", "w_max", "v_gap",
                 "hinge_active", "mse_unweighted")
        row = {"step": step, **dict(zip(names, values))}
        row["w_per_t_bin"] = [None if math.isnan(x) else x for x in values[len(names):]]
        row["lr"] = self.cfg.optim.lr * lr_factor(step, self.cfg)
        return row

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name
        if self._finishing:  # training is over and checkpointed: stopping now loses nothing
            raise _Interrupted()

    def run(self) -> dict:
        t = self.cfg.train
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        metrics_f = open(self.run_dir / "metrics.jsonl", "a")
        bar = None
        if t.progress:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        last_t = time.perf_counter()
        row = {}
        # log lines above the bar instead of through it, so train.log gets them with the bar on
        redirect = contextlib.ExitStack()
        try:
            if bar is not None:
                from tqdm.contrib.logging import logging_redirect_tqdm
                redirect.enter_context(logging_redirect_tqdm(loggers=[log], tqdm_class=type(bar)))
            it = iter(self.loader)
            while self.step < t.steps and self.stop_signal is None:
                step, indices, x1 = next(it)
                assert step == self.step, f"data loader at step {step}, trainer at {self.step}"
                row = self.train_step(indices, x1)
                now = time.perf_counter()
                row["img_per_s"] = t.batch_size / max(now - last_t, 1e-9)
                row["skipped_images"] = getattr(self.loader, "skipped_count", 0)
                last_t = now
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
                if not row["finite"]:
                    self.nonfinite += 1
                    log.warning("step %d: non-finite loss (L_f=%s, L_V=%s, grad norms %s/%s): step skipped "
                                "(%d of train.max_nonfinite=%d)", self.step, row["loss_f"], row["loss_v"],
                                row["grad_norm_f"], row["grad_norm_v"], self.nonfinite, t.max_nonfinite)
                    if self.nonfinite > t.max_nonfinite:
                        last = self.latest_checkpoint()
                        raise TrainingError(
                            f"stopping at step {self.step}: {self.nonfinite} non-finite losses exceed "
                            f"train.max_nonfinite={t.max_nonfinite}; last good checkpoint: {last or 'none'}")
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(L_f=f"{row['loss_f']:.4f}", L_V=f"{row['loss_v']:.3f}", ess=f"{row['ess']:.1f}")
                if self.step % t.log_every == 0:
                    log.info("step %d  L_f %.4f  L_V %.4f  ESS %.1f  V gap %.3f  %.1f img/s", self.step,
                             row["loss_f"], row["loss_v"], row["ess"], row["v_gap"], row["img_per_s"])
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                    self.save_checkpoint()
                if t.sample_every and self.step % t.sample_every == 0:
                    self.write_samples()
                    self.write_plot()
            ckpt = self.save_checkpoint()
            # From here a signal stops at once: the final grid and evaluation can take minutes,
            # and rerunning the command redoes them from this checkpoint.
            self._finishing = True
            try:
                if self.stop_signal is None:
                    if t.sample_every:  # the final grid (sample_every=0 turns grids off)
                        self.write_samples()
                    self.write_plot()
                    self.evaluate(row)
            except _Interrupted:
                self._finishing = False  # a second signal now would escape as a traceback
                log.warning("%s received during the final samples/evaluation; training is complete", self.stop_signal)
            if self.stop_signal:
                log.warning("%s received: checkpoint %s written at step %d; exiting", self.stop_signal, ckpt, self.step)
        finally:
            self._finishing = False
            redirect.close()
            metrics_f.close()
            if bar is not None:
                bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return {"step": self.step, "stopped_by": self.stop_signal, "last": row,
                "checkpoint": str(self.latest_checkpoint())}

    # ------------------------------------------------------------------ outputs
    def sample_ema(self, n: int, net=None, seed: int | None = None) -> torch.Tensor:
        from .sampler import sample
        cfg = self.cfg
        s = cfg.sample
        return sample(net if net is not None else self.ema, n=n,
                      shape=(cfg.data.channels, cfg.data.resolution, cfg.data.resolution),
                      steps=s.steps, sigma=cfg.bridge.sigma, predicts=cfg.model.predicts,
                      t_min=cfg.bridge.t_min, t_eps=cfg.bridge.t_eps, seed=s.seed if seed is None else seed,
                      em=s.em, batch_size=s.batch_size, device=self.device,
                      bf16=s.bf16 and self.device.type == "cuda", compile=s.compile, cuda_graph=s.cuda_graph,
                      progress=False)

    def write_samples(self) -> Path:
        from .sampler import save_grid
        images = self.sample_ema(self.cfg.train.sample_grid)
        out = self.run_dir / "samples" / f"samples-{self.step:08d}.png"
        out.parent.mkdir(exist_ok=True)
        save_grid(images, out)
        atomic_write(self.run_dir / "samples.png", lambda tmp: shutil.copyfile(out, tmp))
        return out

    def evaluate(self, last: dict) -> dict:
        """metrics.json: final losses and a download-free quality number (sliced Wasserstein
        distance to held-out images) for the EMA drift and for an untrained net of the same shape."""
        from . import data, metrics, models
        cfg, n = self.cfg, self.cfg.train.eval_images
        result = {"step": self.step, "final": last, "parameters": {"drift": self.n_drift, "potential": self.n_potential},
                  "weights.scheme": cfg.weights.scheme, "sample.steps": cfg.sample.steps}
        if n:
            if cfg.data.dataset == "shapes":  # a different seed: images the run never saw
                ref_set = data.make_dataset("shapes", resolution=cfg.data.resolution, channels=cfg.data.channels,
                                            num_images=n, seed=cfg.train.seed + 1)
                result["reference_images"] = f"{n} held-out procedural images"
                picked = range(n)
            else:  # a seeded random subset: a folder's sorted order often groups images by class or source
                ref_set = self.dataset
                g = torch.Generator().manual_seed(cfg.train.seed)
                picked = sorted(torch.randperm(len(ref_set), generator=g)[:n].tolist())
                result["reference_images"] = (f"{len(picked)} training images, a seeded random subset "
                                              "(no held-out split)")
            ref = torch.stack([ref_set[i] for i in picked])
            torch.manual_seed(cfg.train.seed)
            untrained = models.DriftUNet(**drift_arch(cfg)).to(self.device).eval()
            trained_images = self.sample_ema(len(ref), seed=cfg.sample.seed + 1)
            untrained_images = self.sample_ema(len(ref), net=untrained, seed=cfg.sample.seed + 1)
            result["swd_trained"] = metrics.sliced_wasserstein(trained_images.cpu(), ref)
            result["swd_untrained"] = metrics.sliced_wasserstein(untrained_images.cpu(), ref)
            result["metric"] = "sliced Wasserstein-2 distance to reference images (lower is better; not FID)"
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(result, indent=1) + "\n")
        return result

    def write_plot(self) -> Path | None:
        from .plots import plot_metrics
        return plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
