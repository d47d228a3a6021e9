"""Benchmark of the fused Triton kernels against the PyTorch reference (issue: fused Triton kernels).

On a GPU, for each B×C×H×W and pred dtype, medians (triton.testing.do_bench) of
  * the V-weighted bridge loss, forward + backward: fused kernel vs the eager reference vs
    torch.compile of the reference;
  * bridge sampling (x1, t → x_t): fused kernel vs eager vs compiled reference;
  * the noise-only kernel (draws the same x0 and ε normals, only reduces them): the
    Philox/Box–Muller limit;
  * the device-to-device copy bandwidth, measured in the same run.
gbps counts the bytes the fused kernel must move (loss: read pred and x1, write d loss/d pred;
bridge: read x1, write x_t); pct_copy_bw compares that rate with the copy. Kernel rows call the
public wrappers with validate=False (the trainer draws t itself); a "checked" row shows the
cost of the default t check (one device→host sync). TF32 is set off explicitly (no matmuls here).

On CPU there is no GPU timing to report: the script says so, times one tiny shape under the
interpreter (labelled as such) when TRITON_INTERPRET=1 is set, and writes those rows only.
    python bench/bench_loss_kernel.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton runs on CPU only in interpreter mode, chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth_gbps, device_name, time_ms, write_results  # noqa: E402

from agm_fast import bridge, config  # noqa: E402
from agm_fast import kernels as K  # noqa: E402

SHAPES = [(64, 3, 64, 64), (128, 3, 64, 64), (256, 3, 64, 64), (32, 3, 256, 256), (128, 3, 256, 256)]
QUICK_SHAPES = [(32, 3, 256, 256), (128, 3, 256, 256), (64, 3, 64, 64)]
SEED, STEP, SIGMA = 1234, 7, 0.5
# the loss hyperparameters at the config's defaults (the ops have none of their own)
_W = config.WeightsConfig()
LOSS_KW = dict(predicts=config.ModelConfig().predicts, scheme=_W.scheme, favour=_W.favour, tau=_W.tau, clip=_W.clip)


def make_inputs(shape, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    b = shape[0]
    x1 = torch.rand(shape, generator=gen, device=device) * 2 - 1
    pred = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
    t = torch.rand(b, generator=gen, device=device) * 0.999
    v = torch.randn(b, generator=gen, device=device)
    idx = torch.arange(b, device=device, dtype=torch.int64)
    return x1, pred, t, v, idx


def reference_loss(pred, x1, t, v, idx):
    return bridge.weighted_bridge_loss(pred, x1, t, v, seed=SEED, step=STEP, sample_index=idx,
                                       sigma=SIGMA, **LOSS_KW).loss


def loss_step(loss_fn, pred, x1, t, v, idx):
    """Forward + backward; autograd.grad so that no .grad accumulation is timed."""
    return torch.autograd.grad(loss_fn(pred, x1, t, v, idx), pred)[0]


def kernel_loss(pred, x1, t, v, idx, validate=False):
    loss, _per_sample, _weights = K.weighted_bridge_loss(pred, x1, t, v, seed=SEED, step=STEP, sample_index=idx,
                                                         sigma=SIGMA, validate=validate, **LOSS_KW)
    return loss


def reference_bridge(x1, t, idx):
    x0, eps = bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, x1.device)
    return bridge.bridge_sample(x1, t, x0, eps, SIGMA)


def row(name, shape, dtype, ms, nbytes, copy_gbps=None, eager_ms=None, compile_ms=None, **extra):
    r = {"name": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "ms": ms}
    if nbytes is not None:
        r["gbps"] = nbytes / ms / 1e6
        if copy_gbps:
            r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps
    if eager_ms is not None:
        r["speedup_vs_eager"] = eager_ms / ms
    if compile_ms is not None:
        r["speedup_vs_compile"] = compile_ms / ms
    r["img_per_s"] = shape[0] / ms * 1e3
    r.update(extra)
    return r


def bench_gpu(device, shapes, with_compile):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    copy_gbps = copy_bandwidth_gbps(device)
    rows = [{"name": "copy_bandwidth", "shape": [1 << 28], "gbps": copy_gbps}]
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    compiled_loss = torch.compile(reference_loss) if with_compile else None
    compiled_bridge = torch.compile(reference_bridge) if with_compile else None
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        for dtype in (torch.bfloat16, torch.float32):
            x1, pred, t, v, idx = make_inputs(shape, dtype, device)
            elt = torch.tensor([], dtype=dtype).element_size()
            loss_bytes = numel * (4 + 2 * elt)  # read x1 (fp32) and pred, write d loss/d pred
            checked_loss = lambda *a: kernel_loss(*a, validate=True)  # noqa: E731
            fused = time_ms(lambda: loss_step(kernel_loss, pred, x1, t, v, idx), device)
            checked = time_ms(lambda: loss_step(checked_loss, pred, x1, t, v, idx), device)
            eager = time_ms(lambda: loss_step(reference_loss, pred, x1, t, v, idx), device)
            comp = (time_ms(lambda: loss_step(compiled_loss, pred, x1, t, v, idx), device)
                    if with_compile else None)
            noise = time_ms(lambda: K.noise_sum(SEED, STEP, idx, numel // shape[0]), device)
            rows += [row("loss_fwd_bwd_triton", shape, dtype, fused, loss_bytes, copy_gbps, eager, comp,
                         ms_noise_only=noise, pct_of_noise_only_time=100 * noise / fused),
                     row("loss_fwd_bwd_triton_checked_t", shape, dtype, checked, loss_bytes, copy_gbps, eager, comp),
                     row("loss_fwd_bwd_eager", shape, dtype, eager, None)]
            if with_compile:
                rows.append(row("loss_fwd_bwd_compile", shape, dtype, comp, None, eager_ms=eager))
            print(f"{shape} {dtype}: fused {fused:.4f} ms (checked {checked:.4f}), eager {eager:.4f}, "
                  f"compile {comp if comp is None else round(comp, 4)}, noise-only {noise:.4f}", flush=True)
        x1 = x1.detach()
        bridge_bytes = numel * 8  # read x1, write x_t (fp32)
        fused = time_ms(lambda: K.bridge_sample(x1, t, seed=SEED, step=STEP, sample_index=idx, sigma=SIGMA,
                                                validate=False), device)
        eager = time_ms(lambda: reference_bridge(x1, t, idx), device)
        comp = time_ms(lambda: compiled_bridge(x1, t, idx), device) if with_compile else None
        rows += [row("bridge_sample_triton", shape, torch.float32, fused, bridge_bytes, copy_gbps, eager, comp),
                 row("bridge_sample_eager", shape, torch.float32, eager, None)]
        if with_compile:
            rows.append(row("bridge_sample_compile", shape, torch.float32, comp, None, eager_ms=eager))
        print(f"{shape} bridge: fused {fused:.4f} ms, eager {eager:.4f}, compile {comp}", flush=True)
    return rows


def bench_cpu_interpreter(device):
    """One tiny shape under the interpreter: a functional timing, not a performance number."""
    shape = (4, 3, 32, 32)
    x1, pred, t, v, idx = make_inputs(shape, torch.float32, device)
    fused = time_ms(lambda: loss_step(kernel_loss, pred, x1, t, v, idx), device, warmup=1, rep=3)
    eager = time_ms(lambda: loss_step(reference_loss, pred, x1, t, v, idx), device, warmup=1, rep=3)
    return [row("loss_fwd_bwd_triton_interpreter_cpu", shape, torch.float32, fused, None),
            row("loss_fwd_bwd_eager_cpu", shape, torch.float32, eager, None)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the two 256² target shapes and 64×3×64² only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ok, why = K.available()
    print(f"device: {device_name(device)}; triton path: {'native' if ok else why}")
    if device.type == "cuda":
        if not ok:
            sys.exit(f"the Triton path cannot run natively here: {why}")
        rows = bench_gpu(device, QUICK_SHAPES if args.quick else SHAPES, not args.no_compile)
        notes = ("GPU medians (triton.testing.do_bench). Kernel rows use validate=False; "
                 "*_checked_t rows include the default t check (a host sync). TF32 off.")
    else:
        print("GPU timings need a GPU: no GPU numbers are produced on this machine.")
        if not K.interpreter_active():
            print("Triton's interpreter is not active either; nothing to time.")
            return
        rows = bench_cpu_interpreter(device)
        notes = ("CPU only: the Triton kernel ran in Triton's interpreter (TRITON_INTERPRET=1), so its "
                 "time measures the interpreter, not the kernel. GPU timings need a GPU.")
    for r in rows:
        print(r)
    print("wrote", write_results("loss_kernel", device, rows, notes))


if __name__ == "__main__":
    main()
