"""bench/bench_step.py on a tiny configuration: its results JSON has the documented keys and types
(docs/design.md §7, the bench_step.py docstring), switches that cannot run on the CPU are rows with
a reason, and the profiler's categories account for the timed step (within 10 %).

The tiny configuration is demo32 at base width 16, batch 32, one thread, optim.impl=foreach: enough
work per op that the profiler's own cost (a few µs per op) stays inside the 10 % (for_loop AdamW
alone adds ~10,000 small ops per step), small enough for the CI budget.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_step  # noqa: E402

MEASURED = {"name": str, "group": str, "preset": str, "scheme": str, "batch": int, "device_kind": str,
            "overrides": list, "resolution": int, "params_drift": int, "params_potential": int,
            "implementations": dict, "first_step_s": float, "ms": float, "ms_min": float, "ms_max": float,
            "img_per_s": float, "peak_mem_kind": str, "gflops_per_image": float, "tflops_per_s": float,
            "mfu": float, "categories_ms": dict, "profiled_step_ms": float, "other_host_or_idle_ms": float,
            "profile_ratio": float, "profile_cpu_ratio": float, "regions_marked": str, "profiled_steps": int}
TOP = {"bench": str, "device": str, "torch": str, "command": str, "date": str, "notes": str, "rows": list}


def _within_10_percent(doc) -> bool:
    r = next((r for r in doc["rows"] if "ms" in r), None)
    return r is not None and 0.9 <= r["profile_cpu_ratio"] <= 1.1


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread):
    """One run of the suite; a second one if the first's CPU-time ratio missed the 10 % (on a shared
    machine a neighbour can stretch one step's CPU time too: contended caches and cores). A
    profiler that really distorts the step misses in both runs."""
    for attempt in range(2):
        out = tmp_path_factory.mktemp("bench")
        path = bench_step.main(["--device", "cpu", "--preset", "demo32", "--batch", "32", "--schemes", "agm",
                                "--rows", "fp32,fused_norm,cuda_graph", "--sizes", "none", "--threads", "1",
                                "--set", "model.channels=16", "--set", "optim.impl=foreach", "--reps", "9",
                                "--warmup", "1", "--profile-steps", "3", "--load-note", "test", "--out", str(out)])
        doc = json.loads(path.read_text())
        if _within_10_percent(doc):
            break
    return path, doc


def test_files_and_top_level(results):
    path, doc = results
    assert path.name.startswith("step-cpu-") and path.suffix == ".json"
    assert path.with_suffix(".md").exists() and path.with_suffix(".png").stat().st_size > 0
    for key, typ in TOP.items():
        assert isinstance(doc[key], typ), key
    assert doc["bench"] == "step"
    assert "CPU RESULTS" in doc["notes"]


def test_measured_row_schema(results):
    _, doc = results
    rows = [r for r in doc["rows"] if "skipped" not in r]
    assert [r["name"] for r in rows] == ["demo32 b32 agm: fp32 eager"]
    r = rows[0]
    for key, typ in MEASURED.items():
        assert key in r, key
        assert isinstance(r[key], typ) and not isinstance(r[key], bool), (key, r[key])
    assert r["peak_mem_kind"] == "cpu_rss_delta"
    assert r["peak_mem_gb"] is None or isinstance(r["peak_mem_gb"], float)
    assert r["resolution"] == 32 and r["batch"] == 32
    assert math.isclose(r["img_per_s"], 32e3 / r["ms"])
    assert r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert 0 < r["mfu"] < 1 and r["gflops_per_image"] > 0
    assert set(r["categories_ms"]) == set(bench_step.CATEGORIES)
    assert all(v >= 0 for v in r["categories_ms"].values())
    assert r["regions_marked"] == "all" and r["profiled_steps"] == 3


def test_cpu_skips_have_reasons(results):
    """On the CPU the fused norm (Triton interpreter) and the CUDA graph are rows with a reason, and
    the cumulative rows after them are named without the skipped switch."""
    _, doc = results
    skipped = {r["name"]: r["skipped"] for r in doc["rows"] if "skipped" in r}
    assert set(skipped) == {"demo32 b32 agm: fp32+channels_last+fused_norm",
                            "demo32 b32 agm: fp32+channels_last+compile+cuda_graph[kernels=torch,dropout=0]"}
    assert "interpreter" in skipped["demo32 b32 agm: fp32+channels_last+fused_norm"]
    assert "needs CUDA" in skipped["demo32 b32 agm: fp32+channels_last+compile+cuda_graph[kernels=torch,dropout=0]"]


def test_categories_account_for_the_step(results):
    """The categories sum to the profiled step's span, all of its parts are present, and profiling
    adds under 10 % to the step's CPU time: the breakdown describes the step that was timed. (The
    wall-clock ratio, profile_ratio, is the bench's to report, not a test's to assert: another
    process on the cores stretches wall time but not this process's CPU time.)"""
    _, doc = results
    r = next(r for r in doc["rows"] if "ms" in r)
    total = sum(r["categories_ms"].values())
    assert math.isclose(total, r["profiled_step_ms"], rel_tol=1e-6)
    assert math.isclose(r["profile_ratio"], total / r["ms_min"])
    assert 0.9 <= r["profile_cpu_ratio"] <= 1.1, r
    for cat in ("conv/matmul", "norm", "elementwise", "attention", "optimiser", "loss and bridge", "data"):
        assert r["categories_ms"][cat] > 0, cat


def _subtree_self_us(e):
    return e.self_cpu_time_total + sum(_subtree_self_us(c) for c in e.cpu_children)


def test_backward_ops_follow_their_forward_region():
    """A backward op belongs to the region of the forward op that made its autograd node; ops
    outside every region go by their name."""
    from torch.profiler import ProfilerActivity, profile, record_function
    a = torch.randn(96, 96, requires_grad=True)
    b = torch.randn(96, 96, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench:step"):
            with record_function("bench:attention"):
                y = torch.mm(a, b)
            z = torch.mm(y, b)  # outside every region: conv/matmul by name
            z.sum().backward()
    events = prof.events()
    cats = bench_step.categorise(events, "cpu")["categories_ms"]
    fwd = [e for e in events if e.name == "aten::mm" and e.cpu_parent is not None]
    region = next(e for e in events if e.name == "bench:attention")
    in_region = next(e for e in fwd if e.cpu_parent is region)
    node = next(e for e in events if e.name.startswith("autograd::engine::evaluate_function: MmBackward")
                and e.sequence_nr == in_region.sequence_nr)
    # the region (its forward mm and the host time inside it) and the backward node of that mm
    expected_us = _subtree_self_us(region) + _subtree_self_us(node)
    assert math.isclose(cats["attention"] * 1e3, expected_us, rel_tol=1e-6)
    assert cats["conv/matmul"] > 0


def test_optimiser_region_takes_its_elementwise_ops():
    """for_loop AdamW runs plain aten ops (mul_, addcdiv_, …): inside Optimizer.step they are optimiser time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    p = torch.nn.Parameter(torch.randn(256, 256))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], foreach=False, fused=False)
    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench:step"):
            opt.step()
    cats = bench_step.categorise(prof.events(), "cpu")["categories_ms"]
    assert cats["optimiser"] > 0 and cats["elementwise"] == 0 and cats["conv/matmul"] == 0


@pytest.mark.parametrize("name, category", [
    ("aten::convolution_backward", "conv/matmul"), ("aten::addmm", "conv/matmul"),
    ("aten::native_group_norm_backward", "norm"), ("aten::silu_backward", "elementwise"),
    ("aten::_to_copy", "layout copies"), ("aten::copy_", "layout copies"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_foreach_lerp_", "optimiser"),
    ("Optimizer.step#AdamW.step", "optimiser"), ("aten::upsample_nearest2d", "elementwise"),
    ("triton_red_fused_native_group_norm_silu_0", "norm"), ("triton_poi_fused_add_mul_1", "elementwise"),
    ("CompiledFunction", "elementwise"), ("## Call CompiledFxGraph f3x ##", "elementwise"),
    ("cudaDeviceSynchronize", "other")])
def test_op_category(name, category):
    assert bench_step.op_category(name) == category


def test_not_applied_names_switches_the_trainer_ignored():
    impl = {"drift.channels_last": False, "step.compile": "nets", "drift.norm_impl": "torch"}
    asked = ["train.precision=fp32", "model.channels_last=true", "train.compile=nets", "model.fused_norm=triton"]
    assert bench_step.not_applied(asked, impl) == ["model.channels_last=true", "model.fused_norm=triton"]


def test_marked_regions():
    assert bench_step.marked_regions(["train.precision=bf16", "model.channels_last=true"]) == "all"
    assert bench_step.marked_regions(["train.compile=nets"]) == "loss"
    assert bench_step.marked_regions(["train.compile=step", "train.kernels=torch"]) == "none"
    assert bench_step.marked_regions(["train.compile=nets", "train.cuda_graph=true"]) == "none"
