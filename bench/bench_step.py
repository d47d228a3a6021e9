"""Benchmark of the whole AGM training step (issue 10, docs/design.md §7 and §8).

What is timed is what trains: each row builds an agm_fast.trainer.Trainer from a preset plus the
row's config switches (so every switch runs the implementation the trainer runs, as it lands) and
times `trainer.agm_step` fed by the trainer's own loader: one row = next(loader) + one AGMStep
(both nets forward and backward, AdamW of both, EMA). The procedural shapes dataset stands in for
image folders, so no preset needs data on disk.

Per row: ms/step (median of synchronised repetitions; the warm-up, where torch.compile and
CUDA-graph capture happen, is excluded and reported as first_step_s), img/s, peak memory, FLOPs per
image (torch.utils.flop_counter.FlopCounterMode over one eager step: convolutions, matmuls and
SDPA, forward and backward; xformers kernels are not counted), MFU against the device's peak, and a
torch.profiler breakdown of the step into CATEGORIES.

    python bench/bench_step.py                        # the suite on the default device
    python bench/bench_step.py --quick                # short: one preset, fewer repetitions, no sweeps
    python bench/bench_step.py --preset demo32 --rows fp32,channels_last,compile --device cpu
    python bench/bench_step.py --preset celeba64 --batch 64 --schemes agm

Rows
  switch rows (per --preset, per scheme: agm = weights.scheme=softmax, drift-only = uniform):
    fp32            eager, train.precision=fp32 (the reference)
    bf16            eager, bf16 autocast
    then cumulative on the chain precision (bf16 on CUDA, fp32 on the CPU, where train.precision=auto
    trains in fp32), each adding its switch to the rows before it:
    channels_last   model.channels_last=true
    fused_norm      model.fused_norm=triton (on the CPU that is the Triton interpreter: skipped unless
                    --interpreter; its timing says nothing about a GPU)
    compile         train.compile=nets
    compile_step    train.compile=step instead of nets, with train.kernels=torch (what it can trace);
                    a variant: later rows go on from the compile row
    cuda_graph      train.cuda_graph=true with train.kernels=torch and model.dropout=0 (what a capture
                    needs; the row's name says so), on the compile row (CUDA only)
    A switch that cannot run here (a ConfigError or any error building or running the step) gives a
    row with "skipped" and the reason, and later rows are built without it.
  preset rows (--sizes): bf16 eager AGM (fp32 on the CPU) at each preset's own resolution and batch.
  attention rows (--attention, CUDA only): math / sdpa / xformers at 128² and 256² (res128, res256),
    with and without model.checkpointing, at the preset batch and at the largest batch that fits
    (doubling, then bisection, catching out-of-memory).

Memory: CUDA rows report torch.cuda.max_memory_allocated over the timed steps (weights, optimiser
state and activations; peak_mem_kind "cuda_max_allocated"). CPU rows report the growth of the
resident set during one warm step: VmHWM after it minus VmRSS before it, with the peak reset through
/proc/self/clear_refs and freed heap returned by malloc_trim first (peak_mem_kind "cpu_rss_delta":
activations and temporaries, not the weights).

MFU = FLOPs per step / step time / peak. CUDA peak: dense bf16 tensor-core FLOP/s from GPU_PEAK_TFLOPS
(by device name; no entry → no MFU). CPU peak: an fp32 GEMM (torch.mm, 2048²) timed in the same run,
labelled "measured fp32 mm": MFU on the CPU says how close the step is to this machine's own GEMM.

Profiler categories (self time of every profiled op: device time on CUDA, CPU time on the CPU):
conv/matmul, norm, elementwise (pointwise ops, reductions, padding, upsampling; in compiled rows
inductor's fused kernels unless their name says norm, and on the CPU its unnamed C++ kernels), layout copies
(copy_, _to_copy, contiguous, cat: autocast casts and NCHW↔NHWC transposes), attention (the whole
self-attention blocks of the drift net: norm, projections, softmax/SDPA), optimiser (AdamW, gradient
clipping, EMA, zero_grad), loss and bridge (t and noise, bridge samples, negatives, the weighted loss),
data (the loader), other (ops of no category, plus the host time between ops on the CPU or the
device's idle time on CUDA). Regions (data, attention, loss and bridge, optimiser) win over op names;
a backward op belongs to the region of the forward op that made its autograd node (sequence numbers).
In eager rows the attention and loss/bridge regions are marked for the profiled steps only (forward
hooks on the attention modules; record_function wrappers around the bridge/loss functions the step
calls); compile=nets rows mark the loss/bridge only, compile=step and CUDA-graph rows nothing
(`regions_marked`: all | loss | none), and unmarked ops fall back to their names. The profiled steps are spread between
the timed ones and the fastest is kept; its categories sum to its span, and `profile_ratio` = that
span / the fastest unprofiled step (ms_min): both are the step least disturbed by other work on the
machine, so the ratio measures what the profiler adds, not the load. It must be within 10 % of 1 for
the breakdown to describe the timed step. On a CPU shared with other work even the fastest steps
vary by more than that, so CPU rows add `profile_cpu_ratio`: the process CPU time of a profiled step
over that of a timed one (medians), which the load does not inflate.

Output: bench/results/step-<device>-<date>.json + .md (bench/common.py, written again after every row,
so a run cut short keeps its rows) + .png (img/s per row; stacked categories in ms per step).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import device_name, write_results  # noqa: E402

from agm_fast import bridge, config as config_mod, dispatch, models  # noqa: E402

CATEGORIES = ("conv/matmul", "norm", "elementwise", "layout copies", "attention", "optimiser",
              "loss and bridge", "data", "other")
SCHEMES = {"agm": "softmax", "drift-only": "uniform"}
# (row, its overrides, whether later rows keep it). The step's own limits shape two rows:
# train.compile=step traces train.kernels=torch only and is a variant that later rows do not keep;
# train.cuda_graph captures train.kernels=torch, compile=nets|off and model.dropout=0 only
# (agm_fast.step.check_compile / check_cuda_graph), which its row sets and its name says.
CHAIN = (("channels_last", ("model.channels_last=true",), True),
         ("fused_norm", ("model.fused_norm=triton",), True),
         ("compile", ("train.compile=nets",), True),
         ("compile_step", ("train.compile=step", "train.kernels=torch"), False),
         ("cuda_graph", ("train.cuda_graph=true", "train.kernels=torch", "model.dropout=0"), True))
FORCED_NOTE = {"compile_step": "[kernels=torch]", "cuda_graph": "[kernels=torch,dropout=0]"}
ROWS = ("fp32", "bf16") + tuple(name for name, _, _ in CHAIN)
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the first key
# contained in the device name wins, so the more specific names come first.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
                   ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("B100", 1750.0),
                   ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.1),
                   ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0))

# ---------------------------------------------------------------- op names → categories
_CONV = ("conv", "mm", "matmul", "linear", "gemm", "cudnn", "mkldnn_conv")
_NORM = ("group_norm", "layer_norm", "batch_norm", "native_norm", "groupnorm", "norm_silu")
_ATTN = ("scaled_dot_product", "flash_attention", "efficient_attention", "xformers", "fmha", "cudnn_attention")
_OPTIM = ("optimizer.", "_foreach_", "adam", "lerp", "clip_grad")
_LAYOUT = ("aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat", "memcpy",
           "aten::to", "aten::_copy_from")
_LOSS = ("agm_fast::", "bridge", "philox")


def op_category(name: str) -> str:
    """Category of one op by its name (the fallback when no region marks it)."""
    n = name.lower()
    for words, cat in ((_OPTIM, "optimiser"), (_ATTN, "attention"), (_NORM, "norm"), (_LOSS, "loss and bridge"),
                       (_CONV, "conv/matmul"), (_LAYOUT, "layout copies")):
        if any(w in n for w in words):
            return cat
    if n.startswith("aten::") or "fused" in n or "triton" in n or n.startswith("cpp_") or "compiled" in n:
        # remaining aten ops are pointwise, reductions, views, padding, upsampling; compiled
        # kernels without a norm in their name are fused pointwise/reduction kernels, and on the
        # CPU inductor's C++ kernels run unnamed inside CompiledFunction / "Call CompiledFxGraph"
        return "elementwise"
    return "other"


REGION_PREFIX = "bench:"


def categorise(events, device_type: str) -> dict:
    """ms per category of one step from torch.profiler's FunctionEvents, the step inside a
    record_function "bench:step" whose CPU span is the step (module docstring). CPU ops carry the
    time: their self CPU time on the CPU; on CUDA the self device time of the kernels they launched
    (kernel events themselves are not counted again)."""
    from torch.autograd import DeviceType
    cuda = device_type == "cuda"
    step_name = REGION_PREFIX + "step"
    ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]

    def region_of(e):
        p = e
        while p is not None:
            if p.name.startswith(REGION_PREFIX) and p.name != step_name:
                return p.name[len(REGION_PREFIX):]
            if p.name.startswith("Optimizer."):
                return "optimiser"
            p = p.cpu_parent
        return None

    # a forward op inside a region marks its autograd node's sequence number with the region
    regions, seq_region = {}, {}
    for e in ops:
        regions[id(e)] = r = region_of(e)
        if r is not None and e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            seq_region.setdefault(e.sequence_nr, r)

    def backward_region(e):
        p = e
        while p is not None:
            if p.name.startswith("autograd::engine::evaluate_function") and p.sequence_nr in seq_region:
                return seq_region[p.sequence_nr]
            p = p.cpu_parent
        return None

    ms = dict.fromkeys(CATEGORIES, 0.0)
    steps = [e for e in ops if e.name == step_name]
    if len(steps) != 1:
        raise ValueError(f"expected one {step_name!r} event in the profile, found {len(steps)}")
    span_us = sum(e.cpu_time_total for e in steps)
    for e in ops:
        if e.name == step_name:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            cat = regions[id(e)] or backward_region(e) or op_category(e.name)
            ms[cat if cat in CATEGORIES else "other"] += us / 1e3
    if cuda:
        # kernels no op launched (CUDA-graph replays) and the device's idle time inside the step
        kernel_us = sum(e.time_range.elapsed_us() for e in events
                        if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        unattributed = max(0.0, kernel_us / 1e3 - sum(ms.values()))
        idle = max(0.0, span_us / 1e3 - kernel_us / 1e3)
        ms["other"] += unattributed + idle
        rest = idle
    else:  # the steps' own self time: Python and dispatch between ops
        rest = sum(e.self_cpu_time_total for e in steps) / 1e3
        ms["other"] += rest
    return {"categories_ms": ms, "profiled_step_ms": span_us / 1e3, "other_host_or_idle_ms": rest}


@contextlib.contextmanager
def _regions(trainer, attention: bool):
    """Mark the bridge/loss functions of the step and (attention=True) the attention blocks for the
    profiler, for the profiled steps only (restored afterwards). Only what runs eagerly is marked:
    hooks or wrappers inside a compiled graph would make it recompile."""
    from torch.profiler import record_function
    from agm_fast import step as step_mod
    handles, stack = [], []

    def enter(mod, args):
        rf = record_function(REGION_PREFIX + "attention")
        rf.__enter__()
        stack.append(rf)

    def leave(mod, args, out):
        stack.pop().__exit__(None, None, None)

    for m in trainer.drift.modules() if attention else ():
        if isinstance(m, models.SelfAttention):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    patched = []

    def wrap(module, name):
        fn = getattr(module, name)

        def labelled(*a, **k):
            with record_function(REGION_PREFIX + "loss and bridge"):
                return fn(*a, **k)
        setattr(module, name, labelled)
        patched.append((module, name, fn))

    for module, name in ((dispatch, "bridge_sample"), (dispatch, "weighted_bridge_loss"),
                         (bridge, "negatives"), (bridge, "sample_t"), (bridge, "potential_hinge_loss")):
        if getattr(step_mod, name, None) is None:  # step.py calls them as module attributes
            wrap(module, name)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, name, fn in patched:
            setattr(module, name, fn)


# ---------------------------------------------------------------- building and running one row

def bench_overrides(device: torch.device, batch: int, run_dir: str, threads: int) -> list[str]:
    """What every row sets: procedural data on the device, no samples/evaluation/checkpoints."""
    return ["data.dataset=shapes", "data.path=", f"data.num_images={max(2 * batch, 16)}", "data.workers=0",
            "data.loader=memory", f"train.batch_size={batch}", "train.micro_batch=0", f"train.device={device}",
            f"train.run_dir={run_dir}", "train.sample_every=0", "train.eval_images=0", "train.eval_every=0",
            "train.ckpt_every=0", "train.progress=false", "train.steps=1000000", f"train.threads={threads}"]


def build(preset: str, overrides: list[str]):
    from agm_fast.trainer import Trainer
    cfg = config_mod.load(preset, overrides)
    return Trainer(cfg, resume=False)


class Runner:
    """next(loader) + Trainer.train_step, as Trainer.run calls them."""

    def __init__(self, trainer):
        self.trainer, self.it = trainer, iter(trainer.loader)
        self.device = trainer.device

    def __call__(self):
        from torch.profiler import record_function
        with record_function(REGION_PREFIX + "data"):
            step, indices, x1 = next(self.it)
        return self.trainer.train_step(indices, x1, step)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def step_times_ms(run: Runner, reps: int, cpu_ms: list | None = None) -> list[float]:
    """Wall clock of `reps` synchronised steps (each step already ends in a host read: the guard);
    the process's CPU time of each goes to `cpu_ms` if given."""
    out = []
    for _ in range(reps):
        run.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        run.sync()
        out.append((time.perf_counter() - t0) * 1e3)
        if cpu_ms is not None:
            cpu_ms.append((time.process_time() - c0) * 1e3)
    return out


def _cpu_rss_delta_gb(run: Runner) -> float | None:
    """VmHWM after one step − VmRSS before it (module docstring); None where /proc cannot do it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
            raise OSError(key)
        before = status("VmRSS:")
        run()
        return (status("VmHWM:") - before) / 1e9
    except OSError:
        return None


def count_flops(run: Runner) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        run()
    return int(fc.get_total_flops())


def profile_one(run: Runner, regions: str) -> dict:
    """One step under torch.profiler, categorised."""
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    ctx = _regions(run.trainer, attention=regions == "all") if regions != "none" else contextlib.nullcontext()
    with ctx, tprofile(activities=acts) as prof:
        run.sync()
        c0 = time.process_time()
        with record_function(REGION_PREFIX + "step"):
            run()
            run.sync()
        cpu_ms = (time.process_time() - c0) * 1e3
    return dict(categorise(prof.events(), run.device.type), cpu_ms=cpu_ms)


def timed_and_profiled(run: Runner, reps: int, n_prof: int, regions: str) -> tuple[list[float], dict | None]:
    """`reps` timed steps with `n_prof` profiled steps spread between them, so that both see the
    same machine (a shared CPU's load drifts within seconds). The profile kept is the fastest one
    (the least disturbed by other processes), with the number of profiled steps and, on the CPU,
    cpu_ratio: the process CPU time of the profiled steps over that of the timed ones (medians),
    which other processes do not inflate: what the profiler itself adds."""
    times, cpu, profs = [], [], []
    blocks = [reps // (n_prof + 1) + (i < reps % (n_prof + 1)) for i in range(n_prof + 1)]
    for i, k in enumerate(blocks):
        times += step_times_ms(run, k, cpu)
        if i < n_prof:
            profs.append(profile_one(run, regions))
    if not profs:
        return times, None
    out = dict(min(profs, key=lambda p: p["profiled_step_ms"]), steps=len(profs))
    if run.device.type == "cpu":
        out["cpu_ratio"] = statistics.median(p["cpu_ms"] for p in profs) / statistics.median(cpu)
    return times, out


def implementations(trainer) -> dict:
    """What the trainer resolved (its run_info.json) and the execution settings its nets and step
    ended with, read from the objects (absent attributes: None)."""
    import json
    info = json.loads((trainer.run_dir / "run_info.json").read_text())
    impl = dict(info.get("implementations", {}))
    d = trainer.drift
    impl.update({"drift.norm_impl": getattr(d, "norm_impl", None),
                 "drift.channels_last": getattr(d, "channels_last", None),
                 "drift.checkpointing": getattr(d, "checkpointing", None),
                 "step.compile": getattr(trainer.agm_step, "compile", None),
                 "step.cuda_graph": getattr(trainer, "graphed", None) is not None,
                 "adamw_f": {k: trainer.opt_f.defaults.get(k) for k in ("foreach", "fused", "capturable")}})
    return impl


# a requested switch → the implementation value that shows it took effect
APPLIED = {"model.channels_last=true": ("drift.channels_last", True),
           "model.checkpointing=true": ("drift.checkpointing", True),
           "model.fused_norm=triton": ("drift.norm_impl", "triton"),
           "train.compile=nets": ("step.compile", "nets"), "train.compile=step": ("step.compile", "step"),
           "train.cuda_graph=true": ("step.cuda_graph", True)}


def not_applied(overrides: list[str], impl: dict) -> list[str]:
    """Switches a row asks for that the trainer at this commit did not put into effect."""
    return [o for o in overrides if o in APPLIED and impl.get(APPLIED[o][0]) != APPLIED[o][1]]


def marked_regions(overrides: list[str]) -> str:
    """What the profiler can mark in a row: all regions (eager), the loss/bridge only (compile=nets:
    the nets are compiled, the step around them is eager), none (compile=step, CUDA graph)."""
    if is_eager(overrides):
        return "all"
    return "loss" if "train.compile=nets" in overrides and "train.cuda_graph=true" not in overrides else "none"


def merge_overrides(base: list[str], adds) -> list[str]:
    """base then adds, a later value of a key replacing the earlier one."""
    out = {o.split("=", 1)[0]: o for o in base}
    out.update((o.split("=", 1)[0], o) for o in adds)
    return list(out.values())


def is_eager(overrides: list[str]) -> bool:
    """No compilation or graph capture: FLOPs can be counted and profiler regions marked."""
    return not any(o in ("train.compile=nets", "train.compile=step", "train.cuda_graph=true") for o in overrides)


class Suite:
    def __init__(self, args):
        self.args = args
        self.device = dispatch.resolve_device(args.device, "--device")
        self.rows: list[dict] = []
        self.flops: dict[tuple, int] = {}
        self.peak_tflops, self.peak_kind = self._peak()
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_step_")
        self.json_path: Path | None = None

    def _peak(self) -> tuple[float | None, str]:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            for key, tf in GPU_PEAK_TFLOPS:
                if key in name:
                    return tf, f"dense bf16 tensor-core peak of {key} (data sheet)"
            return None, f"no peak known for {name}"
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        tflops = 2 * n ** 3 / min(times) / 1e12
        return tflops, f"measured fp32 mm {n}² on this CPU, {torch.get_num_threads()} threads (best of 5)"

    def notes(self) -> str:
        a = self.args
        cpu = self.device.type == "cpu"
        parts = [("CPU RESULTS (not a GPU): " + (a.load_note or "machine load not stated") + ". ") if cpu else "",
                 f"Whole AGM step (next(loader) + AGMStep) from Trainer-built nets, procedural shapes data; "
                 f"ms = median of {a.reps} synchronised steps after {a.warmup} warm-up steps (first_step_s); "
                 f"MFU peak: {self.peak_kind} = "
                 f"{self.peak_tflops:.3g} TFLOP/s; " if self.peak_tflops else f"MFU: {self.peak_kind}; ",
                 "peak_mem_gb: " + ("torch.cuda.max_memory_allocated over the timed steps" if not cpu else
                                    "CPU resident-set growth during one warm step (VmHWM − VmRSS), not weights"),
                 "; categories: torch.profiler self time per category in ms/step (bench_step.py docstring)."]
        return "".join(parts)

    def save(self):
        self.json_path = write_results("step", self.device, self.rows, self.notes())
        write_markdown(self.json_path)
        return self.json_path

    def measure(self, name: str, preset: str, scheme: str, batch: int, extra: list[str], *, group: str,
                flops_key=None, profile_steps: int | None = None) -> dict:
        a = self.args
        cpu = self.device.type == "cpu"
        row = {"name": name, "group": group, "preset": preset, "scheme": scheme, "batch": batch,
               "device_kind": "cpu" if cpu else "cuda", "overrides": list(extra)}
        run_dir = tempfile.mkdtemp(dir=self.tmp.name)
        overrides = bench_overrides(self.device, batch, run_dir, a.threads) + list(a.set) + list(extra)
        trainer = run = None
        try:
            trainer = build(preset, overrides)
            row["resolution"] = trainer.cfg.data.resolution
            row["params_drift"] = trainer.n_drift
            row["params_potential"] = trainer.n_potential
            run = Runner(trainer)
            t0 = time.perf_counter()
            run()
            run.sync()
            row["first_step_s"] = time.perf_counter() - t0
            for _ in range(a.warmup - 1):
                run()
            row["implementations"] = implementations(trainer)  # after the first forward resolved them
            missing = not_applied(extra, row["implementations"])
            if missing:  # measured all the same, and said: the row is not what its name asks for
                row["not_applied"] = missing
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            eager = is_eager(extra)
            n_prof = profile_steps if profile_steps is not None else a.profile_steps
            times, prof = timed_and_profiled(run, a.reps, n_prof, regions=marked_regions(extra))
            ms = statistics.median(times)
            row.update(ms=ms, ms_min=min(times), ms_max=max(times), img_per_s=batch * 1e3 / ms)
            if self.device.type == "cuda":
                row.update(peak_mem_gb=torch.cuda.max_memory_allocated(self.device) / 1e9,
                           peak_mem_kind="cuda_max_allocated")
            else:
                row.update(peak_mem_gb=_cpu_rss_delta_gb(run), peak_mem_kind="cpu_rss_delta")
            key = flops_key or (preset, batch, scheme, tuple(a.set))
            if key not in self.flops and eager:
                self.flops[key] = count_flops(run)
            if key in self.flops:
                fl = self.flops[key]
                row.update(gflops_per_image=fl / batch / 1e9, tflops_per_s=fl / (ms / 1e3) / 1e12)
                if self.peak_tflops:
                    row["mfu"] = row["tflops_per_s"] / self.peak_tflops
            if prof is not None:
                row.update(categories_ms=prof["categories_ms"], profiled_step_ms=prof["profiled_step_ms"],
                           other_host_or_idle_ms=prof["other_host_or_idle_ms"],
                           profile_ratio=sum(prof["categories_ms"].values()) / min(times), regions_marked=marked_regions(extra),
                           profiled_steps=prof["steps"])
                if "cpu_ratio" in prof:
                    row["profile_cpu_ratio"] = prof["cpu_ratio"]
            print(f"{name:<58} {ms:10.2f} ms  {row['img_per_s']:9.1f} img/s"
                  + (f"  mfu {row['mfu'] * 100:5.1f} %" if "mfu" in row else "")
                  + (f"  profile/timed {row['profile_ratio']:.3f}" if "profile_ratio" in row else "")
                  + (f"  NOT APPLIED by the trainer: {row['not_applied']}" if "not_applied" in row else ""), flush=True)
        except Exception as e:  # a switch that cannot run here: recorded, the suite goes on
            if self.device.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                reason = "out of memory"
            else:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if a.verbose:
                traceback.print_exc()
            row["skipped"] = reason
            print(f"{name:<58} skipped: {reason}", flush=True)
        finally:
            trainer = run = None  # before the collection: an OOM search needs the memory back
            self._free()
        self.rows.append(row)
        self.save()
        return row

    def _free(self):
        import gc
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()

    # ------------------------------------------------------------ the three groups
    def switch_rows(self, preset: str, batch: int):
        a, cpu = self.args, self.device.type == "cpu"
        chain_precision = a.chain_precision or ("fp32" if cpu else "bf16")
        for label in a.schemes:
            scheme = [f"weights.scheme={SCHEMES[label]}"]
            tag = f"{preset} b{batch} {label}"
            if "fp32" in a.rows:
                self.measure(f"{tag}: fp32 eager", preset, label, batch, scheme + ["train.precision=fp32"],
                             group="switches")
            if "bf16" in a.rows:
                self.measure(f"{tag}: bf16 eager", preset, label, batch, scheme + ["train.precision=bf16"],
                             group="switches")
            chain = scheme + [f"train.precision={chain_precision}"]
            names = [chain_precision]
            for row, adds, kept in CHAIN:
                name = f"{tag}: {'+'.join(names + [row])}{FORCED_NOTE.get(row, '')}"
                why = self._unavailable(row)
                if why:
                    if row in a.rows:
                        self.rows.append({"name": name, "group": "switches", "preset": preset, "scheme": label,
                                          "batch": batch, "device_kind": self.device.type, "skipped": why})
                        print(f"{name:<58} skipped: {why}", flush=True)
                        self.save()
                    continue
                trial = merge_overrides(chain, adds)
                if row in a.rows:
                    r = self.measure(name, preset, label, batch, trial, group="switches")
                    if "skipped" in r:  # later rows are built without a switch that cannot run
                        continue
                if kept:
                    chain, names = trial, names + [row]

    def _unavailable(self, row: str) -> str | None:
        if self.device.type == "cuda":
            return None
        if row == "cuda_graph":
            return "needs CUDA (train.cuda_graph captures a CUDA graph)"
        if row == "fused_norm" and not self.args.interpreter:
            return "CPU: the Triton kernel would run in the Triton interpreter (timing meaningless; --interpreter runs it)"
        return None

    def preset_rows(self):
        cpu = self.device.type == "cpu"
        for preset in self.args.sizes:
            cfg = config_mod.load(preset, ["data.path=unused"])
            batch = self.args.batch or (min(cfg.train.batch_size, 8) if cpu else cfg.train.batch_size)
            prec = "fp32" if cpu else "bf16"
            self.measure(f"preset {preset} {cfg.data.resolution}² b{batch} agm: {prec} eager", preset, "agm", batch,
                         [f"train.precision={prec}"], group="presets")

    def attention_rows(self):
        if self.device.type != "cuda":
            self.rows.append({"name": "attention backends × checkpointing at 128², 256²", "group": "attention",
                              "device_kind": "cpu", "skipped": "GPU only (--attention needs a CUDA device)"})
            self.save()
            return
        for preset in ("res128", "res256"):
            batch = config_mod.load(preset, ["data.path=unused"]).train.batch_size
            for backend in ("math", "sdpa", "xformers"):
                for ckpt in (False, True):
                    extra = ["train.precision=bf16", f"model.attention={backend}",
                             f"model.checkpointing={str(ckpt).lower()}"]
                    tag = f"attention {preset} {backend}{' +checkpointing' if ckpt else ''}"
                    r = self.measure(f"{tag} b{batch}", preset, "agm", batch, extra, group="attention",
                                     profile_steps=0)
                    if "skipped" in r and r["skipped"] != "out of memory":
                        continue  # the backend cannot run here: no search
                    largest = self.largest_batch(preset, extra, start=batch)
                    r["largest_batch"] = largest
                    self.save()
                    print(f"{tag}: largest batch {largest}", flush=True)

    def largest_batch(self, preset: str, extra: list[str], start: int, cap: int = 4096) -> int:
        """The largest batch for which two steps run (doubling from `start`, then bisection to ±1/16)."""
        def fits(b):
            run_dir = tempfile.mkdtemp(dir=self.tmp.name)
            trainer = run = None
            try:
                trainer = build(preset, bench_overrides(self.device, b, run_dir, self.args.threads) + extra)
                run = Runner(trainer)
                run()
                run()
                run.sync()
                return True
            except torch.cuda.OutOfMemoryError:
                return False
            finally:
                trainer = run = None
                self._free()
        lo, hi = 0, None
        b = start
        while b <= cap:
            if fits(b):
                lo, b = b, b * 2
            else:
                hi = b
                break
        if lo == 0:  # not even `start`: search downwards
            hi, b = start, start // 2
            while b >= 1 and not fits(b):
                hi, b = b, b // 2
            lo = b if b >= 1 else 0
        if hi is None:
            return lo
        while hi - lo > max(1, lo // 16):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def write_markdown(json_path: Path) -> Path:
    """The .md beside the JSON as two readable tables (the generic one of bench/common.py puts the
    nested categories and implementations in single cells): the rows, then ms per category."""
    import json
    doc = json.loads(json_path.read_text())
    rows = doc["rows"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    lines = [f"# step on {doc['device']} ({doc['date'][:10]})", "", doc["notes"], "",
             f"torch {doc.get('torch')}, command: `{doc.get('command')}`", "",
             "| row | ms (median) | ms (min) | img/s | peak GB | GFLOP/img | MFU % | first step s | profile/timed | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("skipped") and f"skipped: {r['skipped']}" or (
            r.get("not_applied") and f"not applied by the trainer: {', '.join(r['not_applied'])}") or ""
        if "largest_batch" in r:
            note = f"largest batch {r['largest_batch']}" + (f"; {note}" if note else "")
        mfu = r.get("mfu")
        lines.append(f"| {r['name']} | {f(r.get('ms'), '.1f')} | {f(r.get('ms_min'), '.1f')} | {f(r.get('img_per_s'), '.1f')} | "
                     f"{f(r.get('peak_mem_gb'), '.3f')} | {f(r.get('gflops_per_image'), '.3g')} | "
                     f"{f(mfu and 100 * mfu, '.1f')} | {f(r.get('first_step_s'), '.1f')} | "
                     f"{f(r.get('profile_ratio'), '.2f')} | {note} |")
    prof = [r for r in rows if "categories_ms" in r]
    if prof:
        lines += ["", "ms per step by category (profiler; the fastest profiled step):", "",
                  "| row | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
        for r in prof:
            lines.append(f"| {r['name']} | " + " | ".join(f"{r['categories_ms'][c]:.1f}" for c in CATEGORIES) + " |")
    out = json_path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if "ms" in r]
    if not done:
        return None
    names = [r["name"] for r in done]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 4 + 0.55 * len(done)), sharey=True)
    y = range(len(done))
    ax1.barh(y, [r["img_per_s"] for r in done], color="tab:blue")
    ax1.set_xlabel("images / s")
    ax1.set_title(title, fontsize=9)
    left = [0.0] * len(done)
    colours = plt.get_cmap("tab10")
    for i, cat in enumerate(CATEGORIES):
        vals = [r.get("categories_ms", {}).get(cat, 0.0) for r in done]
        ax2.barh(y, vals, left=left, color=colours(i), label=cat)
        left = [a + b for a, b in zip(left, vals)]
    ax2.scatter([r["ms"] for r in done], list(y), marker="|", s=200, color="k", label="timed ms (median, unprofiled)")
    ax2.set_xlabel("ms per step (profiler categories)")
    ax2.set_yticks(list(y), names, fontsize=7)
    ax2.invert_yaxis()
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 1.0 / (3 + len(done))), ncol=5)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--preset", default=None, help="presets of the switch rows, comma-separated "
                   "(default: celeba64 on CUDA, demo32 on the CPU)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"switch rows to run, of {','.join(ROWS)}")
    p.add_argument("--schemes", default="agm,drift-only", help="agm,drift-only (weights.scheme softmax / uniform)")
    p.add_argument("--batch", type=int, default=0, help="batch of the switch and preset rows (0: the preset's; "
                   "on the CPU the preset rows use at most 8)")
    p.add_argument("--sizes", default=None, help="presets of the preset rows (default: res32,celeba64,res128,res256 "
                   "on CUDA, demo32 on the CPU; 'none' for none)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="attention-backend rows (default: on for CUDA without --quick)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no preset or attention rows")
    p.add_argument("--reps", type=int, default=0, help="timed steps per row (default 20 on CUDA, 5 on the CPU; quick: 10/3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compile and capture happen here)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps per row, the median kept "
                   "(default 3; quick: 1; 0: no profile)")
    p.add_argument("--chain-precision", choices=("fp32", "bf16"), default=None,
                   help="precision of the cumulative rows (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--interpreter", action="store_true", help="on the CPU, run model.fused_norm=triton in the "
                   "Triton interpreter too")
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: the preset's / torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every row (e.g. a reduced width: model.channels=16)")
    p.add_argument("--load-note", default="", help="how loaded the machine was (CPU results carry it)")
    p.add_argument("--out", default="", help="results folder (default bench/results)")
    p.add_argument("--verbose", action="store_true", help="tracebacks of skipped rows")
    a = p.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    bad = sorted(set(a.rows) - set(ROWS))
    if bad:
        p.error(f"--rows: unknown {bad}; allowed {','.join(ROWS)}")
    a.schemes = [s for s in a.schemes.split(",") if s]
    if set(a.schemes) - set(SCHEMES):
        p.error(f"--schemes: allowed {','.join(SCHEMES)}")
    return a


def main(argv=None) -> Path:
    a = parse_args(argv)
    if a.out:
        common.RESULTS = Path(a.out)
    logging.getLogger("agm_fast").setLevel(logging.WARNING)
    if a.threads:  # before the CPU's GEMM peak is measured: the rows run with these threads
        torch.set_num_threads(a.threads)
    suite = Suite(a)
    cuda = suite.device.type == "cuda"
    if cuda:  # the trainer's convs/matmuls as they train: TF32 on for fp32 rows (recorded in the JSON)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not a.reps:
        a.reps = (10 if a.quick else 20) if cuda else (3 if a.quick else 5)
    if a.profile_steps is None:
        a.profile_steps = 1 if a.quick else 3
    presets = (a.preset or ("celeba64" if cuda else "demo32")).split(",")
    if a.sizes is None:
        a.sizes = "none" if a.quick else ("res32,celeba64,res128,res256" if cuda else "demo32")
    a.sizes = [] if a.sizes == "none" else a.sizes.split(",")
    if a.attention is None:
        a.attention = cuda and not a.quick
    print(f"step benchmark on {device_name(suite.device)}; MFU peak: "
          f"{suite.peak_tflops and f'{suite.peak_tflops:.3g} TFLOP/s'} ({suite.peak_kind})", flush=True)
    for preset in presets:
        batch = a.batch or config_mod.load(preset, ["data.path=unused"]).train.batch_size
        suite.switch_rows(preset, batch)
    suite.preset_rows()
    if a.attention:
        suite.attention_rows()
    path = suite.save()
    png = plot(suite.rows, path, f"AGM step on {device_name(suite.device)}"
               + (" (CPU)" if not cuda else "") + f", {path.stem}")
    print(f"wrote {path}, {path.with_suffix('.md')}" + (f", {png}" if png else ""))
    return path


if __name__ == "__main__":
    main()
