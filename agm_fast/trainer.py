"""The AGM run loop (docs/design.md §1): data, logging and metrics, the cadence of checkpoints,
sample grids and evaluation, signals, the final report.

One iteration is agm_fast.step.AGMStep; every file format is agm_fast.checkpoint. The data
order is keyed by (seed, global sample index) and all noise by (seed, step, global sample index,
stream), so a resumed run repeats the uninterrupted one exactly.

Under torchrun (`dist`, agm_fast.distributed) every rank runs this loop on its slice of each
global batch; rank 0 alone writes logs, metrics, checkpoints, sample grids and the evaluation.
A signal on any rank stops every rank after the same step (one all-reduce of a host flag per
step), and the checkpoint is written before any rank leaves. A checkpoint does not record the
world size: written with N ranks, it resumes with M at the same global sample.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, config as config_mod, dispatch, distributed, step as step_mod
from .checkpoint import drift_arch, potential_arch
from .config import Config, ConfigError
from .files import atomic_write, atomic_write_text
from .step import AGMStep, diagnostics_row

log = logging.getLogger("agm_fast")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged); the message says why and what is intact."""


class _Interrupted(BaseException):
    """SIGINT/SIGTERM after the final checkpoint or during an evaluation (train.eval_every). A
    BaseException so that no `except Exception` on the way (image loading, plotting) mistakes it
    for a failure of its own."""


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = True, dist: distributed.Dist | None = None):
        from . import data, models  # noqa: F401  (imported here: heavy and optional parts)

        self.cfg = cfg
        t = cfg.train
        self.dist = dist
        self.rank, self.world = distributed.rank_world(dist)
        self.is_main = self.rank == 0
        distributed.per_rank_batch(t.batch_size, t.micro_batch, self.world)  # fail now, naming the fields
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = dist.device if dist is not None else dispatch.resolve_device(t.device, "train.device")
        self.run_dir = Path(t.run_dir)
        if t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda"):
            self.autocast_dtype = torch.bfloat16
        else:
            self.autocast_dtype = None

        if t.sample_every or t.eval_images or t.eval_every:  # fail now, not at the first sample grid
            from .sampler import time_grid
            try:
                time_grid(cfg.sample.steps, cfg.bridge.t_min, cfg.bridge.t_eps)
                em_impl, _ = dispatch.resolve("sample.em", cfg.sample.em, self.device)
            except ValueError as e:
                raise ConfigError(f"{e} (or set train.sample_every=0, train.eval_images=0 and "
                                  "train.eval_every=0)") from None
            if cfg.sample.cuda_graph and (self.device.type != "cuda" or em_impl != "ext"):
                raise ConfigError(f"sample.cuda_graph=true needs a CUDA device and the fused op; here: "
                                  f"{self.device}, sample.em → {em_impl}")
        self.kernels_impl, why = dispatch.resolve("train.kernels", t.kernels, self.device)
        log.info("train.kernels: %s (%s)", self.kernels_impl, why)
        self.optim_impl, why = step_mod.resolve_adamw_impl(cfg.optim.impl, self.device)
        log.info("optim.impl: %s (%s)", self.optim_impl, why)
        step_mod.check_compile(cfg, self.kernels_impl, dist, self.device)  # fail now, naming the fields
        if t.cuda_graph:
            step_mod.check_cuda_graph(cfg, self.device, self.kernels_impl, self.optim_impl, dist)

        # data.num_images sizes the procedural set only: a folder is used whole (a cap of the
        # default 20000 would silently drop most of CelebA)
        self.dataset = data.make_dataset(cfg.data.dataset, path=cfg.data.path or None,
                                         resolution=cfg.data.resolution, channels=cfg.data.channels,
                                         num_images=cfg.data.num_images if cfg.data.dataset == "shapes" else None,
                                         seed=t.seed)
        log.info("dataset: %s, %d images", cfg.data.path if cfg.data.dataset == "folder" else "shapes",
                 len(self.dataset))
        torch.manual_seed(t.seed)
        # execution settings, not architecture (checkpoints load across them); the EMA copy inherits them
        self.drift = models.DriftUNet(**drift_arch(cfg)).to(self.device).set_fast_paths(
            channels_last=cfg.model.channels_last, checkpointing=cfg.model.checkpointing)
        self.potential = models.PotentialNet(**potential_arch(cfg)).to(self.device)
        self.drift.resolve_attention_backend(self.device)  # logs the backend and why
        self.ema = copy.deepcopy(self.drift).eval().requires_grad_(False)
        self.n_drift = models.count_parameters(self.drift)
        self.n_potential = models.count_parameters(self.potential)
        log.info("parameters: drift %s, potential %s (%.2f %% of drift)", f"{self.n_drift:,}",
                 f"{self.n_potential:,}", 100 * self.n_potential / self.n_drift)
        self.opt_f, self.opt_v = step_mod.build_optimisers(cfg, self.drift, self.potential, self.optim_impl,
                                                           capturable=t.cuda_graph)
        self.step = 0
        self.nonfinite = 0
        self.stop_signal: str | None = None
        self._signum = 0
        self._finishing = False
        self._evaluating = False        # a signal now interrupts the evaluation (train.eval_every)
        self._eval_ref = None           # the periodic evaluation's reference: built once per run
        self._evals_logged: set[int] = set()  # steps with an eval row in metrics.jsonl
        self._timing_logged: set[str] = set()  # one-off timings already written to metrics.jsonl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and self.is_main:
            checkpoint.set_aside_previous_run(self.run_dir)
        latest = checkpoint.latest(self.run_dir) if resume and self.is_main else None
        if dist is not None:  # rank 0's choice; every rank reads that checkpoint
            latest = dist.broadcast_object(None if latest is None else str(latest))
            latest = None if latest is None else Path(latest)
            if latest is not None and not checkpoint.is_complete(latest):
                raise checkpoint.CheckpointError(
                    f"{latest}: rank 0 resumes from it but rank {self.rank} cannot read it (train.run_dir must be "
                    "on storage that every node sees)")
        nets = dict(drift=self.drift, potential=self.potential, ema=self.ema)
        if latest is not None:
            state = checkpoint.load(latest, cfg=cfg, opt_f=self.opt_f, opt_v=self.opt_v, device=self.device, **nets)
            for opt in (self.opt_f, self.opt_v):  # a checkpoint of any optim.impl resumes with this one
                step_mod.set_adamw_impl(opt, self.optim_impl, capturable=t.cuda_graph)
            self.step, self.nonfinite = state["step"], state["nonfinite"]
            log.info("resumed from %s at step %d", latest, self.step)
            if self.step > t.steps and self.is_main:
                log.warning("the checkpoint is past train.steps=%d: nothing to train (a new run needs another "
                            "train.run_dir or --no-resume)", t.steps)
        elif t.init_from:
            checkpoint.init_from(t.init_from, cfg=cfg, device=self.device, **nets)
        # after loading: under DDP the wrappers broadcast rank 0's (identical) weights once more
        self.agm_step = AGMStep(cfg, self.drift, self.potential, self.ema, self.opt_f, self.opt_v,
                                device=self.device, kernels=self.kernels_impl, autocast_dtype=self.autocast_dtype,
                                dist=dist)
        log.info("train.compile: %s%s", t.compile, "" if t.compile == "off" else
                 " (the first step's time includes the compilation)")
        # train.cuda_graph: the loop's batches are copied into the graphed step's static buffers
        self.graphed = step_mod.GraphedAGMStep(self.agm_step) if t.cuda_graph else None
        if t.cuda_graph:
            log.info("train.cuda_graph: the whole step is captured at the first step and replayed")
        if self.is_main:
            self._truncate_metrics()
            self._write_run_info()
        if dist is not None:
            log.info("distributed: %d ranks (%s), %d images per rank per step of %d", self.world, dist.backend,
                     t.batch_size // self.world, t.batch_size)
        self.loader = data.make_loader(cfg, self.dataset, device=self.device, start_step=self.step,
                                       rank=self.rank, world=self.world)

    # ------------------------------------------------------------------ run bookkeeping
    def _write_run_info(self) -> None:
        atomic_write_text(self.run_dir / "config.json", config_mod.to_json(self.cfg) + "\n")
        info = {"git_commit": git_commit(), "versions": dispatch.package_versions(), "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "implementations": {"train.kernels": self.kernels_impl, "optim.impl": self.optim_impl,
                                    "train.compile": self.cfg.train.compile,
                                    "train.cuda_graph": self.cfg.train.cuda_graph,
                                    "model.attention": getattr(self.drift, "attention_backend", None),
                                    "autocast": str(self.autocast_dtype)},
                "parameters": {"drift": self.n_drift, "potential": self.n_potential},
                "drift_arch": drift_arch(self.cfg), "potential_arch": potential_arch(self.cfg),
                "distributed": ({"world": self.world, "backend": self.dist.backend} if self.dist is not None
                                else None)}
        atomic_write_text(self.run_dir / "run_info.json", json.dumps(info, indent=1) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (a killed run may have logged beyond its checkpoint).
        A loss row's step is the index of the step it logs (0, 1, …): the checkpoint at step k
        keeps those < k. An eval row's step is the number of steps done when it evaluated: it
        keeps those ≤ k (the evaluation at k saw the checkpointed weights)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                row = json.loads(ln)
                if "eval" in row and row["step"] <= self.step:
                    keep.append(ln)
                    self._evals_logged.add(row["step"])
                elif "eval" not in row and row["step"] < self.step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a kill: the metrics file is a log, not state
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.run_dir)

    def save_checkpoint(self) -> Path:
        """checkpoints/ckpt-<step>/, atomically; NaN/Inf weights are never saved. Under DDP every
        rank checks its (identical) weights, so all stop together, and rank 0 alone writes."""
        final = checkpoint.checkpoint_dir(self.run_dir, self.step)
        if not checkpoint.is_complete(final):
            self._check_weights_finite()
        if not self.is_main:
            return final
        with self.graphed.host_lr() if self.graphed is not None else contextlib.nullcontext():
            return checkpoint.save(self.run_dir, step=self.step, cfg=self.cfg, drift=self.drift,
                                   potential=self.potential, ema=self.ema, opt_f=self.opt_f, opt_v=self.opt_v,
                                   nonfinite=self.nonfinite)

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

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name
        self._signum = signum
        if self._finishing:  # training is over and checkpointed: stopping now loses nothing
            raise _Interrupted()
        if self._evaluating:  # drop the evaluation; the loop stops and checkpoints at this step
            self._evaluating = False
            raise _Interrupted()

    def _stopping(self) -> bool:
        """Whether to stop before the next step. Under DDP every rank calls this once per step and
        all get the same answer: a signal on any rank stops them all after the same step."""
        if self.dist is None:
            return self.stop_signal is not None
        # the flag is signal·2¹⁶ + rank, so the agreed value also names a rank that received it
        flag = self.dist.max_over_ranks((self._signum << 16) + self.rank if self._signum else 0)
        if flag and self.stop_signal is None:
            self.stop_signal = f"{distributed.signal_name(flag >> 16)} (rank {flag & 0xFFFF})"
        return flag != 0

    def train_step(self, indices: torch.Tensor, x1: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimiser step on a loader batch (global indices, images, step) with the configured
        fast paths: what run() does per step and what bench/bench_step.py times."""
        return (self.graphed or self.agm_step)(indices.to(self.device), x1, step)

    def run(self) -> dict:
        t = self.cfg.train
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        metrics_f = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        bar = None
        if t.progress and self.is_main:
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
            if (self.is_main and t.eval_every and 0 < self.step <= t.steps and self.step % t.eval_every == 0
                    and self.step not in self._evals_logged):  # resumed where an evaluation was cut short
                self._periodic_eval(metrics_f)
            while self.step < t.steps and not self._stopping():
                step, indices, x1 = next(it)
                assert step == self.step, f"data loader at step {step}, trainer at {self.step}"
                diag = self.train_step(indices, x1, step)
                if self.is_main:  # the diagnostics are the global batch's on every rank
                    row = diagnostics_row(step, diag, self.cfg)
                    if self.agm_step.compile_seconds is not None and "compile_seconds" not in self._timing_logged:
                        row["compile_seconds"] = self.agm_step.compile_seconds  # the first step, compilation included
                        self._timing_logged.add("compile_seconds")
                    now = time.perf_counter()
                    row["img_per_s"] = t.batch_size / max(now - last_t, 1e-9)
                    row["skipped_images"] = getattr(self.loader, "skipped_count", 0)
                    last_t = now
                    metrics_f.write(json.dumps(row) + "\n")
                    metrics_f.flush()
                else:  # the guard's flag, read on the host inside the step already
                    row = {"finite": bool(diag["finite"])}
                if not row["finite"]:  # the same on every rank: the guard decided on all of them
                    self.nonfinite += 1
                    if self.is_main:
                        log.warning("step %d: non-finite loss (L_f=%s, L_V=%s, grad norms %s/%s): step skipped "
                                    "(%d of train.max_nonfinite=%d)", self.step, row["loss_f"], row["loss_v"],
                                    row["grad_norm_f"], row["grad_norm_v"], self.nonfinite, t.max_nonfinite)
                    if self.nonfinite > t.max_nonfinite:
                        last = self.latest_checkpoint()
                        raise TrainingError(
                            f"stopping at step {self.step}: {self.nonfinite} non-finite losses exceed "
                            f"train.max_nonfinite={t.max_nonfinite}; last good checkpoint: {last or 'none'}")
                self.step += 1
                if not self.is_main:
                    if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                        self.save_checkpoint()  # checks the weights as rank 0 does
                    continue
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(L_f=f"{row['loss_f']:.4f}", L_V=f"{row['loss_v']:.3f}", ess=f"{row['ess']:.1f}")
                if self.step % t.log_every == 0:
                    log.info("step %d  L_f %.4f  L_V %.4f  ESS %.1f  V gap %.3f  %.1f img/s", self.step,
                             row["loss_f"], row["loss_v"], row["ess"], row["v_gap"], row["img_per_s"])
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                    self.save_checkpoint()
                plot = False
                if t.sample_every and self.step % t.sample_every == 0:
                    self.write_samples()
                    plot = True
                if t.eval_every and self.step % t.eval_every == 0:
                    self._periodic_eval(metrics_f)
                    plot = True
                if plot:
                    self.write_plot()
            ckpt = self.save_checkpoint()
            if self.dist is not None:  # no rank leaves before the checkpoint is complete
                self.dist.barrier()
            # From here a signal stops at once: the final grid and evaluation can take minutes,
            # and rerunning the command redoes them from this checkpoint.
            self._finishing = True
            try:
                if self.stop_signal is None and self.is_main:
                    if t.sample_every:  # the final grid (sample_every=0 turns grids off)
                        self.write_samples()
                    self.write_plot()
                    self.evaluate(row)
            except _Interrupted:
                self._finishing = False  # a second signal now would escape as a traceback
                log.warning("%s received during the final samples/evaluation; training is complete", self.stop_signal)
            if self.stop_signal and self.is_main:
                log.warning("%s received: checkpoint %s written at step %d; exiting", self.stop_signal, ckpt, self.step)
        finally:
            self._finishing = False
            redirect.close()
            if metrics_f is not None:
                metrics_f.close()
            if bar is not None:
                bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return {"step": self.step, "stopped_by": self.stop_signal, "last": row,
                "checkpoint": str(self.latest_checkpoint()), "compile_seconds": self.agm_step.compile_seconds}

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
        from .images import save_grid
        images = self.sample_ema(self.cfg.train.sample_grid)
        out = self.run_dir / "samples" / f"samples-{self.step:08d}.png"
        out.parent.mkdir(exist_ok=True)
        save_grid(images, out)
        atomic_write(self.run_dir / "samples.png", lambda tmp: shutil.copyfile(out, tmp))
        return out

    def _reference_images(self, n: int) -> tuple[torch.Tensor, str]:
        """(n reference images [m, C, R, R] on the CPU, what they are) for the final and the
        periodic evaluations: held-out procedural images (another seed) for shapes; for a folder a
        seeded random subset of the training images (evaluate.real_subset with train.seed; all of
        them when the folder holds ≤ n), as a folder's sorted order often groups images by class."""
        from . import data
        cfg = self.cfg
        if cfg.data.dataset == "shapes":  # a different seed: images the run never saw
            ref_set = data.make_dataset("shapes", resolution=cfg.data.resolution, channels=cfg.data.channels,
                                        num_images=n, seed=cfg.train.seed + 1)
            return torch.stack([ref_set[i] for i in range(n)]), f"{n} held-out procedural images"
        from .evaluate import real_subset
        picked = real_subset(len(self.dataset), n, cfg.train.seed)
        return (torch.stack([self.dataset[i] for i in picked]),
                f"{len(picked)} training images, a seeded random subset (no held-out split)")

    def evaluate(self, last: dict) -> dict:
        """metrics.json: final losses and a download-free quality number (sliced Wasserstein
        distance to held-out images) for the EMA drift and for an untrained net of the same shape."""
        from . import metrics, models
        cfg, n = self.cfg, self.cfg.train.eval_images
        result = {"step": self.step, "final": last, "parameters": {"drift": self.n_drift, "potential": self.n_potential},
                  "weights.scheme": cfg.weights.scheme, "sample.steps": cfg.sample.steps}
        if n:
            ref, result["reference_images"] = self._reference_images(n)
            torch.manual_seed(cfg.train.seed)
            untrained = models.DriftUNet(**drift_arch(cfg)).to(self.device).eval()
            trained_images = self.sample_ema(len(ref), seed=cfg.sample.seed + 1)
            untrained_images = self.sample_ema(len(ref), net=untrained, seed=cfg.sample.seed + 1)
            result["swd_trained"] = metrics.sliced_wasserstein(trained_images.cpu(), ref)
            result["swd_untrained"] = metrics.sliced_wasserstein(untrained_images.cpu(), ref)
            result["metric"] = "sliced Wasserstein-2 distance to reference images (lower is better; not FID)"
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(result, indent=1) + "\n")
        return result

    def _periodic_eval(self, metrics_f) -> dict | None:
        """Run one evaluation during training (train.eval_every) and append its row to
        metrics.jsonl. A signal during it drops it (no row) and the loop stops and checkpoints at
        this step; a resumed run evaluates that step again. A failure (e.g. non-finite samples
        of a diverging EMA) is logged and training goes on."""
        if self.stop_signal is not None:  # stopping anyway: the checkpoint comes first
            return None
        try:
            self._evaluating = True
            try:
                row = self.evaluate_periodic()
            finally:
                self._evaluating = False
        except _Interrupted:
            log.warning("%s received during the evaluation at step %d: evaluation dropped", self.stop_signal,
                        self.step)
            return None
        except (ValueError, FloatingPointError) as e:
            log.warning("step %d: the evaluation failed (%s); training goes on", self.step, e)
            return None
        metrics_f.write(json.dumps(row) + "\n")
        metrics_f.flush()
        self._evals_logged.add(self.step)
        return row

    def evaluate_periodic(self) -> dict:
        """One evaluation during training: train.eval_n samples of the EMA drift (seed
        sample.seed + 1, the same noise every time) against the reference images of the final
        evaluation (`_reference_images`), through evaluate.compare: FD-EffLite0 and KID (and PRDC)
        on EfficientNet-Lite0 features, the pixel-space SWD. The reference and its features are
        built at the first call and kept for the run (for a folder also in fid's on-disk cache,
        keyed by the files' checksum). Without the packaged EffLite0 weights: SWD only (logged
        once). Returns the metrics.jsonl row {"step": k, "eval": {...}}."""
        from . import evaluate, metrics
        t0 = time.perf_counter()
        n = self.cfg.train.eval_n
        if self._eval_ref is None:
            self._eval_ref = self._periodic_reference(n)
        real, ref, extract, label = self._eval_ref
        fake = self.sample_ema(n, seed=self.cfg.sample.seed + 1).cpu()
        if ref is None:
            scores = {"swd": metrics.sliced_wasserstein(fake, real)}
        else:
            full, _, _ = evaluate.compare(fake, real, ref, extract, label=label, seed=self.cfg.sample.seed)
            scores = {k: v for k, v in full.items() if k != "sliced_wasserstein"}
            scores["swd"] = full["sliced_wasserstein"]
        seconds = time.perf_counter() - t0
        scores.update(n=n, n_real=int(real.shape[0]), seconds=round(seconds, 3))
        log.info("step %d  eval (N = %d): %s  (%.1f s)", self.step, n,
                 "  ".join(f"{k} {scores[k]:.4g}" for k in (label, "kid_mean", "swd") if k in scores), seconds)
        return {"step": self.step, "eval": scores}

    def _periodic_reference(self, n: int):
        """(reference images, their features or None, the feature extractor, the FD label) of
        `evaluate_periodic`."""
        from . import evaluate, features, fid
        t0 = time.perf_counter()
        real, what = self._reference_images(n)
        ok, why = features.efflite0_available()
        if not ok or real.shape[0] < evaluate.MIN_N:
            why = why if not ok else f"the reference holds {real.shape[0]} images, PRDC needs {evaluate.MIN_N}"
            log.warning("train.eval_every: %s; the evaluations during training report the sliced Wasserstein "
                        "distance only", why)
            return real, None, None, None
        backbone = "efflite0"
        label, wid = features.metric_label(backbone), features.weights_id(backbone)
        batch = min(self.cfg.sample.batch_size, n)
        extract = lambda x: features.extract(x, backbone, batch_size=min(batch, x.shape[0]),  # noqa: E731
                                             device=self.device)
        if self.cfg.data.dataset == "folder":
            key = evaluate.folder_cache_key(self.dataset, real.shape[0], self.cfg.train.seed)
            ref = fid.dataset_features(evaluate.default_cache_dir(), dataset_checksum=key, backbone=backbone,
                                       resolution=self.cfg.data.resolution, compute=lambda: extract(real),
                                       weights_id=wid)
        else:  # procedural images have no checksum: kept in memory for this run only
            feats = extract(real).astype("float32").astype("float64")  # as fid's cache stores them
            ref = fid.DatasetFeatures(feats, *fid.feature_statistics(feats))
        log.info("train.eval_every: reference %s, %s features in %.1f s", what, label, time.perf_counter() - t0)
        return real, ref, extract, label

    def write_plot(self) -> Path | None:
        from .plots import plot_metrics
        return plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
