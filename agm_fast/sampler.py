"""Sampling: Euler–Maruyama of the EMA drift (docs/design.md §1 "sampling", §3 "sampling loop").

    x_0 ~ N(0, I)   (rng stream SAMPLE_X0, step word 0, keyed per global image index)
    x ← x + f(x, t_k)·Δt + σ·sqrt(Δt)·z_k   on t_k = k/N, k = 0 … N−1, Δt = 1/N
    z_k = rng.normal(seed, k, image_index, ·, Stream.EM); no noise on the last step

σ is the checkpoint's bridge.sigma (the trainer learns the drift of the σ-bridge, no score, so
another σ would sample a different process: refused). σ = 0 gives the probability-flow ODE.
Every random number is keyed by (seed, step, global image index), so images do not depend on
batch_size, and the eager loop, the fused op (agm_fast._C) and a CUDA graph give the same images.

Public: em_step, time_grid, sample, sample_from_checkpoint. The drift file format is
agm_fast.checkpoint's; image files are agm_fast.images'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import bridge, checkpoint, checks, dispatch, ext, images, rng
from .config import Config

_DEFAULT = Config()  # the one source of every default below (docs/design.md §1)


# ----------------------------------------------------------------------------- one EM step

def _step_int(step) -> int:
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def em_step_reference(x: torch.Tensor, drift: torch.Tensor, *, dt: float, sigma: float, seed: int, step,
                      image_index, last: bool = False) -> torch.Tensor:
    """Pure-PyTorch EM step, in place, fp32 arithmetic in the order the fused op uses."""
    v = x.float() + drift.float() * dt
    if not last and sigma != 0:
        idx = checks.sample_index(image_index, x.shape[0], x.device, name="image_index")
        z = rng.normal(seed, _step_int(step), idx, x[0].numel(), rng.Stream.EM, x.device).reshape(x.shape)
        v = v + (sigma * math.sqrt(dt)) * z
    x.copy_(v)
    return x


def em_step(x: torch.Tensor, drift: torch.Tensor, *, dt: float, sigma: float, seed: int, step, image_index,
            last: bool = False, impl: str = "auto") -> torch.Tensor:
    """x ← x + drift·dt + σ·sqrt(dt)·z in place (no noise if last or σ = 0); returns x.

    step: int or int64 one-element tensor on x's device (the EM step index k, the Philox step word).
    image_index: int b0 (row b has global index b0 + b) or an int64 tensor [B] on x's device.
    impl: 'torch' (reference), 'ext' (agm_fast._C; an error if it cannot run), 'auto'.
    """
    impl, _ = dispatch.resolve("sample.em", impl, x.device)
    return _em_step_resolved(impl, x, drift, dt=dt, sigma=sigma, seed=seed, step=step, image_index=image_index,
                             last=last)


def _em_step_resolved(impl: str, x, drift, *, dt, sigma, seed, step, image_index, last):
    """em_step for an already resolved implementation ('torch' or 'ext'): no per-step dispatch."""
    if impl == "torch":
        return em_step_reference(x, drift, dt=dt, sigma=sigma, seed=seed, step=step, image_index=image_index,
                                 last=last)
    if last or sigma == 0:
        return ext.em_step_last_(x, drift, dt=dt)
    return ext.em_step_(x, drift, dt=dt, sigma=sigma, seed=seed, step=step, image_index=image_index)


# ----------------------------------------------------------------------------- the time grid

def time_grid(steps: int, t_min: float = 0.0, t_eps: float = 1e-3) -> torch.Tensor:
    """t_k = k/N for k = 0 … N−1 (fp32, computed as fp32(k)/N like the sampling loop does).

    The grid must lie in the trained range [t_min, 1 − t_eps]: t_min = 0 and t_eps ≤ 1/N.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample.steps must be an integer ≥ 1; got {steps!r}")
    if not (math.isfinite(t_min) and math.isfinite(t_eps)):
        raise ValueError(f"bridge.t_min and bridge.t_eps must be finite; got {t_min!r}, {t_eps!r}")
    if t_min > 0:
        raise ValueError(f"the sampling grid starts at t=0 but the drift was trained on t ≥ bridge.t_min={t_min}: "
                         "sampling needs a checkpoint trained with t_min = 0")
    if t_eps * steps > 1 + 1e-9:
        raise ValueError(f"the last grid point t=(N−1)/N={(steps - 1) / steps:.6g} lies outside the trained range "
                         f"t ≤ 1 − bridge.t_eps = {1 - t_eps:.6g}: use sample.steps ≤ {math.floor(1 / t_eps + 1e-9)} "
                         f"or a checkpoint trained with t_eps ≤ 1/{steps}")
    return _t_of_step(torch.arange(steps, dtype=torch.int64), steps)


def _t_of_step(step: torch.Tensor, steps: int) -> torch.Tensor:
    # one expression for the eager loop, the CUDA graph and time_grid: identical t on a device
    return step.to(torch.float32) / float(steps)


# ----------------------------------------------------------------------------- the sampler

def _drift(net, x: torch.Tensor, t: torch.Tensor, predicts: str, autocast: bool) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        pred = net(x, t)
    if not isinstance(pred, torch.Tensor) or pred.shape != x.shape:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"the drift net must return a tensor of x's shape {tuple(x.shape)}; got {got}")
    if predicts == "x1":
        return bridge.drift_from_prediction(pred.float(), x, t, "x1")
    return pred


def _check_sample_args(n, shape, sigma, predicts, seed, batch_size, first_index) -> tuple[int, int, int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of images) must be an integer ≥ 1; got {n!r}")
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"shape must be (C, H, W) of positive ints; got {shape!r}")
    checks.sigma(sigma)
    checks.one_of("predicts", predicts, checks.PREDICTS)
    checks.seed(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample.batch_size must be an integer ≥ 1; got {batch_size!r}")
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0 \
            or first_index + n - 1 > rng.MASK32:
        raise ValueError(f"first_index must be an int ≥ 0 with first_index + n ≤ 2**32; got {first_index!r}")
    return tuple(shape)


def sample(drift_fn, *, n: int, shape, sigma: float, predicts: str = _DEFAULT.model.predicts,
           t_min: float = _DEFAULT.bridge.t_min, t_eps: float = _DEFAULT.bridge.t_eps,
           steps: int = _DEFAULT.sample.steps, seed: int = _DEFAULT.sample.seed, em: str = _DEFAULT.sample.em,
           batch_size: int = _DEFAULT.sample.batch_size, device="cpu", bf16: bool = _DEFAULT.sample.bf16,
           compile: bool = _DEFAULT.sample.compile, cuda_graph: bool = _DEFAULT.sample.cuda_graph,
           progress: bool = True, first_index: int = 0) -> torch.Tensor:
    """n images [n, C, H, W] fp32 on the CPU: EM of drift_fn from x_0 ~ N(0, I) on t_k = k/N.

    drift_fn(x [B,C,H,W] fp32, t [B] fp32) → drift (or x̂1 for predicts='x1'), x's shape; an
    nn.Module is put in eval mode. Image i of the output has global index first_index + i, which
    keys all its noise: the result does not depend on batch_size. bf16: autocast when sampling on
    CUDA (the CPU samples in fp32). Defaults are the config's (sample.*, model.predicts, bridge.*).
    compile: torch.compile the drift net. cuda_graph: capture
    one step (drift forward + fused EM op on static buffers; t and the Philox step live in device
    memory that each replay advances) and replay it N−1 times; the noiseless last step runs eagerly.
    """
    shape = _check_sample_args(n, shape, sigma, predicts, seed, batch_size, first_index)
    time_grid(steps, t_min, t_eps)  # validates steps and the trained range
    device = dispatch.resolve_device(device)
    impl, _ = dispatch.resolve("sample.em", em, device)
    if cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; got device={str(device)!r}")
        if impl != "ext":
            raise ValueError("cuda_graph=True needs the fused op (sample.em=ext or auto with agm_fast._C built "
                             f"with CUDA); sample.em resolved to {impl!r}: {ext.available(device)[1]}")
    autocast = bool(bf16) and device.type == "cuda"
    if isinstance(drift_fn, nn.Module):
        drift_fn.eval()
    net = torch.compile(drift_fn) if compile else drift_fn
    c, h, w = shape
    numel = c * h * w
    dt = 1.0 / steps
    batch = min(batch_size, n)
    out = torch.empty(n, c, h, w, dtype=torch.float32)

    from tqdm.auto import tqdm
    bar = tqdm(total=n, unit="img", desc=f"sampling {steps} steps", disable=not progress)
    with torch.inference_mode():
        graph = _StepGraph(net, (batch, c, h, w), steps, dt, sigma, seed, predicts, autocast, device) \
            if cuda_graph and steps > 1 else None
        for start in range(0, n, batch):
            b = min(batch, n - start)
            idx = torch.arange(first_index + start, first_index + start + b, dtype=torch.int64, device=device)
            x = rng.normal(seed, 0, idx, numel, rng.Stream.SAMPLE_X0, device).reshape(b, c, h, w)
            if graph is not None:
                x = graph.run(x, idx)
            else:
                x = _run_eager(net, x, idx, steps, dt, sigma, seed, predicts, autocast, impl)
            out[start:start + b] = x.float().cpu()
            bar.update(b)
    bar.close()
    return out


def _run_eager(net, x, idx, steps, dt, sigma, seed, predicts, autocast, impl) -> torch.Tensor:
    step = torch.zeros(1, dtype=torch.int64, device=x.device)  # the Philox step word, as in the graph
    for k in range(steps):
        t = _t_of_step(step, steps).expand(x.shape[0])
        drift = _drift(net, x, t, predicts, autocast)
        _em_step_resolved(impl, x, drift, dt=dt, sigma=sigma, seed=seed, step=step if impl == "ext" else k,
                          image_index=idx, last=k == steps - 1)
        step.add_(1)
    return x


class _StepGraph:
    """One EM step on static buffers, replayed N−1 times per batch (then an eager last step).

    On CUDA the step is captured once as a CUDA graph; elsewhere the same step on the same
    buffers runs eagerly, so the buffer logic (padding, t and the Philox step advanced in device
    memory) is tested on the CPU against the eager loop.
    """

    def __init__(self, net, shape, steps, dt, sigma, seed, predicts, autocast, device):
        self.net, self.steps, self.dt, self.sigma, self.seed = net, steps, dt, sigma, seed
        self.predicts, self.autocast = predicts, autocast
        self.batch = shape[0]
        self.x = torch.zeros(shape, dtype=torch.float32, device=device)
        self.idx = torch.arange(self.batch, dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph = None
        if device.type == "cuda":
            self._capture(device)

    def _capture(self, device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture (lazy init, cuDNN plans, compilation)
            for _ in range(3):
                self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def _t(self):
        return _t_of_step(self.step, self.steps).expand(self.batch)

    def _body(self):
        drift = _drift(self.net, self.x, self._t(), self.predicts, self.autocast)
        ext.em_step_(self.x, drift, dt=self.dt, sigma=self.sigma, seed=self.seed, step=self.step,
                     image_index=self.idx)
        self.step.add_(1)  # captured: every replay advances the Philox step and t

    def run(self, x0: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b = x0.shape[0]
        if b < self.batch:  # a short last batch: pad with copies of its last image (rows are independent)
            x0 = torch.cat([x0, x0[-1:].expand(self.batch - b, *x0.shape[1:])])
            idx = torch.cat([idx, idx[-1:].expand(self.batch - b)])
        self.x.copy_(x0)
        self.idx.copy_(idx)
        self.step.zero_()
        for _ in range(self.steps - 1):
            if self.graph is None:
                self._body()
            else:
                self.graph.replay()
        drift = _drift(self.net, self.x, self._t(), self.predicts, self.autocast)
        ext.em_step_last_(self.x, drift, dt=self.dt)
        return self.x[:b].clone()


# ----------------------------------------------------------------------------- from a checkpoint

def sample_from_checkpoint(path, *, n: int, steps: int | None = None, sigma: float | None = None,
                           seed: int = _DEFAULT.sample.seed, em: str = _DEFAULT.sample.em,
                           batch_size: int = _DEFAULT.sample.batch_size, device="cpu",
                           bf16: bool = _DEFAULT.sample.bf16, compile: bool = _DEFAULT.sample.compile,
                           cuda_graph: bool = _DEFAULT.sample.cuda_graph, out_png=None, out_npz=None,
                           nrow: int | None = None, shape=None, progress: bool = True,
                           first_index: int = 0) -> torch.Tensor:
    """Sample n images from a drift checkpoint (a run directory, a checkpoint directory or an
    ema.safetensors file); optionally write a PNG grid and/or a uint8 NHWC .npz.

    steps: None = the checkpoint config's sample.steps (else the default). sigma: None = the checkpoint's
    bridge.sigma; any other value is refused. shape: optional (C, H, W) to check against the
    checkpoint. All arguments are checked before the weights are loaded.
    """
    path = checkpoint.ema_path(path)
    meta = checkpoint.read_drift_meta(path)
    ckpt_shape = checkpoint.drift_image_shape(meta)
    if shape is not None and tuple(shape) != ckpt_shape:
        raise ValueError(f"requested image shape C×H×W={tuple(shape)} but the checkpoint's drift net was built "
                         f"for {ckpt_shape}")
    if sigma is not None and float(sigma) != meta["sigma"]:
        raise ValueError(f"sigma={sigma} differs from the checkpoint's bridge.sigma={meta['sigma']}: the trainer "
                         "learns the drift of that σ-bridge only (no score), so sampling must use it")
    if steps is None:
        steps = int((meta["config"].get("sample") or {}).get("steps", _DEFAULT.sample.steps))
    time_grid(steps, meta["t_min"], meta["t_eps"])
    for target, suffix in ((out_png, ".png"), (out_npz, ".npz")):  # before hours of sampling, not after
        if target is not None:
            images.check_output_path(target, suffix)
    if out_png is not None and nrow is not None:
        images.check_nrow(nrow)
    net, _ = checkpoint.load_drift(path, dispatch.resolve_device(device), meta)
    out = sample(net, n=n, shape=ckpt_shape, steps=steps, sigma=meta["sigma"], predicts=meta["predicts"],
                    t_min=meta["t_min"], t_eps=meta["t_eps"], seed=seed, em=em, batch_size=batch_size,
                    device=device, bf16=bf16, compile=compile, cuda_graph=cuda_graph, progress=progress,
                    first_index=first_index)
    if out_png is not None:
        images.save_grid(out, out_png, nrow=nrow)
    if out_npz is not None:
        images.save_npz(out, out_npz)
    return out
