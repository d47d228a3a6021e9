"""Benchmark of the fused Euler–Maruyama op and the sampler (issue 5, docs/design.md §7).

1. The op (agm_fast._C, noise drawn in-op) vs eager PyTorch (separate mul / add / randn, and the
   reference step with agm_fast.rng noise), in GB/s and as % of the copy bandwidth measured in the
   same run. Bytes = read x + read drift + write x (the noise is never stored by the op).
2. (CUDA) 200-step sampling at 64² with the paper-size drift net (configs/celeba64.toml, bf16
   autocast) at batches 4/16/64/256: eager loop vs CUDA-graph sampler vs graph + torch.compile,
   img/s and the projected minutes for 50,000 samples (one FID evaluation).

    python bench/bench_em.py                 # full run on CUDA (or the CPU op rows without it)
    python bench/bench_em.py --quick         # < 1 min: CPU op vs eager (labelled cpu), or a short GPU pass
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbps, device_name, time_ms, write_results  # noqa: E402

from agm_fast import ext, sampler  # noqa: E402

DT, SIGMA = 1.0 / 200, 0.5
BATCHES_PER_CALL = 3  # sampler rows: batches per timed sample() call


def bench_op(device: torch.device, shapes, dtypes, with_rng_reference: bool) -> list[dict]:
    copy_bw = copy_bandwidth_gbps(device, nbytes=(1 << 28) if device.type == "cuda" else (1 << 26))
    print(f"copy bandwidth on {device_name(device)}: {copy_bw:.1f} GB/s")
    rows = [{"name": "copy (reference bandwidth)", "gbps": copy_bw, "pct_copy_bw": 100.0}]
    for dtype in dtypes:
        for shape in shapes:
            x = torch.randn(shape, device=device).to(dtype)
            drift = torch.randn(shape, device=device).to(dtype)
            idx = torch.arange(shape[0], device=device)
            step = torch.zeros(1, dtype=torch.int64, device=device)
            nbytes = 3 * x.numel() * x.element_size()
            noise_scale = SIGMA * math.sqrt(DT)

            def op():
                torch.ops.agm_fast.em_step_(x, drift, idx, step, DT, SIGMA, 1, 0)

            def eager():  # what a plain loop does: randn, two muls, two adds
                x.add_(drift * DT + noise_scale * torch.randn(shape, device=device, dtype=dtype))

            def reference():  # the same numbers as the op, drawn by agm_fast.rng in PyTorch
                sampler.em_step_reference(x, drift, dt=DT, sigma=SIGMA, seed=1, step=0, image_index=idx)

            eager_ms = time_ms(eager, device)
            op_ms = time_ms(op, device)
            found = [("em_step op (agm_fast._C)", op_ms), ("eager torch (randn, mul, add)", eager_ms)]
            if with_rng_reference:
                found.append(("eager torch, agm_fast.rng noise", time_ms(reference, device, warmup=1, rep=3)))
            for name, ms in found:
                gbps = nbytes / ms / 1e6
                rows.append({"name": f"{name} {str(dtype).replace('torch.', '')}", "shape": list(shape), "ms": ms,
                             "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_bw, "speedup_vs_eager": eager_ms / ms})
                print(f"{rows[-1]['name']:<48} {str(list(shape)):<20} {ms:9.4f} ms {gbps:9.1f} GB/s "
                      f"{rows[-1]['pct_copy_bw']:6.1f} % copy  {eager_ms / ms:6.2f}x eager")
    return rows


def bench_sampler(device: torch.device, batches, steps: int) -> list[dict]:
    from agm_fast import config
    from agm_fast.models import DriftUNet, count_parameters
    from agm_fast.checkpoint import drift_arch
    arch = dict(drift_arch(config.load("celeba64", ["data.path=unused"])), dropout=0.0)
    net = DriftUNet(**arch).to(device).eval().requires_grad_(False)
    print(f"drift net res64: {count_parameters(net) / 1e6:.1f}M parameters, bf16 autocast, {steps} steps")
    rows = []
    for b in batches:
        eager_ips = None
        for name, kw in [("eager loop (EM op)", dict()), ("CUDA graph", dict(cuda_graph=True)),
                         ("CUDA graph + compile", dict(cuda_graph=True, compile=True))]:
            # BATCHES_PER_CALL batches per sample() call: the graph is captured once per call, so its
            # capture is amortised as in a long run (a 50k evaluation is ~200 batches per call)
            run = lambda: sampler.sample(net, n=BATCHES_PER_CALL * b, shape=(3, 64, 64), steps=steps,  # noqa
                                         sigma=SIGMA, em="ext", batch_size=b, device=device, bf16=True,
                                         progress=False, **kw)
            try:
                run()  # warm-up: cuDNN plans, compilation
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize(device)
            except Exception as err:  # report and go on: one failing mode must not lose the others
                print(f"{name} batch {b}: FAILED {type(err).__name__}: {err}")
                rows.append({"name": f"sample {name}", "shape": [b, 3, 64, 64], "error": str(err)[:200]})
                continue
            sec = time.perf_counter() - t0
            ips = BATCHES_PER_CALL * b / sec * steps / 200  # projected to the paper's 200 steps
            eager_ips = eager_ips or ips
            rows.append({"name": f"sample {name}", "shape": [b, 3, 64, 64], "ms": 1e3 * sec / steps / BATCHES_PER_CALL,
                         "img_per_s": ips, "speedup_vs_eager": ips / eager_ips,
                         "minutes_50k": 50_000 / ips / 60, "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9})
            print(f"{rows[-1]['name']:<34} batch {b:4d}: {ips:8.2f} img/s ({ips / eager_ips:4.2f}x eager), "
                  f"50k samples ≈ {50_000 / ips / 60:7.1f} min (ms column = per step)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="< 1 min: small sizes, fewer sampler batches and steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-sampler", action="store_true", help="only the op rows")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    ok, why = ext.available(device)
    if not ok:
        sys.exit(f"bench_em: the EM op cannot run on {device}: {why}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        shapes = [(16, 3, 64, 64), (64, 3, 64, 64)] if args.quick else [(16, 3, 64, 64), (64, 3, 64, 64), (256, 3, 64, 64)]
        rows = bench_op(device, shapes, [torch.float32], with_rng_reference=True)
        noise = getattr(ext._C, "CPU_NOISE", "scalar")  # the op's speed depends on its noise generator
        notes = (f"CPU ({torch.get_num_threads()} threads, op noise generator: {noise}): C++ op vs eager torch. "
                 "The sampler rows need CUDA. Bytes = read x + read drift + write x.")
    else:
        shapes = [(64, 3, 64, 64), (256, 3, 64, 64)] if args.quick else \
            [(64, 3, 64, 64), (256, 3, 64, 64), (1024, 3, 64, 64), (4096, 3, 64, 64)]
        rows = bench_op(device, shapes, [torch.float32, torch.bfloat16], with_rng_reference=not args.quick)
        if not args.no_sampler:
            rows += bench_sampler(device, [4, 16] if args.quick else [4, 16, 64, 256], 40 if args.quick else 200)
        notes = ("Op: bytes = read x + read drift + write x; copy bandwidth measured in this run. Sampler: res64 "
                 "drift net, bf16 autocast, TF32 on; img/s projected to 200 steps when fewer were timed "
                 f"(--quick: 40); each timed sample() call runs {BATCHES_PER_CALL} batches and includes one graph "
                 "capture.")
    path = write_results("em_step", device, rows, notes)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
