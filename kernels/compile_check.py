"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which never lowers them to PTX: a kernel
that the interpreter runs can still fail to compile for a GPU (an op without a lowering, a type
the backend rejects). This script compiles each kernel × dtype × flag variant that the wrappers
launch on CUDA, ahead of time, with Triton's own compiler and ptxas, and reports registers and
spill bytes per variant. Needs no GPU and no driver; refuses to run under TRITON_INTERPRET=1
(the kernels are then interpreter objects). tests/test_kernels.py runs it in a subprocess.

    python -m agm_fast.kernels.compile_check [--arch 80 90] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

DTYPES = ("fp32", "bf16", "fp16")
SEED_TYPES = (("i32", "i32", "i32"), ("u32", "u32", "u32"))  # seed_lo, seed_hi, step: < 2³¹ or ≥ 2³¹


def _variants() -> list[tuple[str, str, dict, dict, int]]:
    """(module, kernel, signature, constexprs, num_warps) for each launch the wrappers make on CUDA."""
    out = []

    def bridge(dt, seeds, channels_last=False):
        const = {"CHANNELS_LAST": channels_last, "BLOCK": 1024, "BF16_RNE_BY_BITS": False}
        return ("bridge_sample", "_bridge_sample_kernel",
                {"x1_ptr": f"*{dt}", "t_ptr": "*fp32", "sample_index_ptr": "*i64", "xt_ptr": f"*{dt}",
                 "n_per_sample": "i32", "n_channels": "i32", "n_hw": "i32", "seed_lo": seeds[0],
                 "seed_hi": seeds[1], "step": seeds[2], "sigma": "fp32", **{k: "constexpr" for k in const}},
                const, 4)

    for dt in DTYPES:
        for seeds in SEED_TYPES:
            out.append(bridge(dt, seeds))
        out.append(bridge(dt, SEED_TYPES[1], channels_last=True))  # NHWC x1 (model.channels_last)

    def loss(pred, x1, drift=True, softmax=True, sign=-1.0, write_grad=True, block_v=16, seeds=SEED_TYPES[1],
             t_bins=False, block_k=16, channels_last=False):
        sig = {"pred_ptr": f"*{pred}", "x1_ptr": f"*{x1}", "t_ptr": "*fp32", "v_ptr": "*fp32", "t_all_ptr": "*fp32",
               "sample_index_ptr": "*i64", "grad_ptr": f"*{pred}" if write_grad else "*fp32",
               "partial_ptr": "*fp32", "weight_ptr": "*fp32", "n_per_sample": "i32", "n_channels": "i32",
               "n_hw": "i32", "n_v": "i32", "v_offset": "i32", "n_bins": "i32", "seed_lo": seeds[0],
               "seed_hi": seeds[1], "step": seeds[2], "sigma": "fp32", "tau": "fp32", "clip": "fp32",
               "grad_scale": "fp32"}
        # T_BLOCK_I/J: the wrapper's tiles of the t_bins ranking on CUDA
        const = {"CHANNELS_LAST": channels_last, "DRIFT_TARGET": drift, "SOFTMAX": softmax, "SIGN": sign,
                 "WRITE_GRAD": write_grad, "T_BINS": t_bins, "BLOCK": 1024, "BLOCK_V": block_v, "BLOCK_K": block_k,
                 "T_BLOCK_I": 16, "T_BLOCK_J": 64, "BF16_RNE_BY_BITS": False}
        sig.update({k: "constexpr" for k in const})
        return ("weighted_bridge_loss", "_weighted_bridge_loss_kernel", sig, const, 4)

    for pred in DTYPES:  # every pred × x1 dtype pair with the default flags
        for x1 in DTYPES:
            out.append(loss(pred, x1))
    for flags in (dict(drift=False), dict(softmax=False), dict(sign=1.0), dict(write_grad=False),
                  dict(block_v=1024), dict(seeds=SEED_TYPES[0]), dict(drift=False, softmax=False, write_grad=False),
                  dict(t_bins=True), dict(t_bins=True, sign=1.0, write_grad=False), dict(t_bins=True, block_k=1024)):
        out.append(loss("bf16", "fp32", **flags))
    # NHWC pred/x1/gradient (model.channels_last): the bf16 trainer's pairs, then the flags
    for pred, x1 in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")):
        out.append(loss(pred, x1, channels_last=True))
    for flags in (dict(drift=False), dict(softmax=False), dict(write_grad=False), dict(t_bins=True)):
        out.append(loss("bf16", "bf16", channels_last=True, **flags))
    out.append(("weighted_bridge_loss", "_finalize_kernel",
                {"partial_ptr": "*fp32", "weight_ptr": "*fp32", "per_sample_ptr": "*fp32", "loss_ptr": "*fp32",
                 "n_rows": "i32", "num_k": "i32", "n_per_sample_f": "fp32", "normalizer": "fp32",
                 "BLOCK_B": "constexpr", "BLOCK_K": "constexpr"},
                {"BLOCK_B": 32, "BLOCK_K": 256}, 8))
    # fused GroupNorm + SiLU: every mode × dtype (x and the time terms in x's dtype, γ/β fp32 as
    # under autocast); both layouts run the same variant (strides are arguments). BLOCK_C: the
    # power of 2 over the channels per group, BLOCK_HW: 2,048 elements per tile (see _blocks)
    for mode in (0, 1, 2):
        for dt in DTYPES:
            for block_c in ((1, 4, 16) if dt == "bf16" else (4,)):
                const = {"MODE": mode, "BLOCK_HW": 2048 // block_c, "BLOCK_C": block_c, "BF16_RNE_BY_BITS": False}
                common = {"w_ptr": "*fp32", "b_ptr": "*fp32", "t1_ptr": f"*{dt}" if mode else "*fp32",
                          "t2_ptr": f"*{dt}" if mode == 2 else "*fp32"}
                dims = {"C": "i32", "n_hw": "i32", "cpg": "i32", "stride_n": "i32", "stride_c": "i32",
                        "stride_hw": "i32"}
                out.append(("group_norm_silu", "_gn_silu_fwd_kernel",
                            {"x_ptr": f"*{dt}", **common, "y_ptr": f"*{dt}", "mean_ptr": "*fp32",
                             "rstd_ptr": "*fp32", **dims, "eps": "fp32", **{k: "constexpr" for k in const}},
                            const, 4))
                out.append(("group_norm_silu", "_gn_silu_bwd_kernel",
                            {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", **common, "mean_ptr": "*fp32",
                             "rstd_ptr": "*fp32", "dx_ptr": f"*{dt}", "dw_part_ptr": "*fp32",
                             "db_part_ptr": "*fp32", "dt1_ptr": "*fp32", "dt2_ptr": "*fp32", **dims,
                             **{k: "constexpr" for k in const}},
                            const, 4))
    out.append(("philox", "_noise_sum_kernel",
                {"sample_index_ptr": "*i64", "partial_ptr": "*fp32", "n_per_sample": "i32", "seed_lo": "u32",
                 "seed_hi": "u32", "step": "u32", "BLOCK": "constexpr"},
                {"BLOCK": 1024}, 4))
    return out


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def _compile(job: tuple[int, tuple]) -> dict:
    """Compile one variant for one arch; {kernel, arch, variant, ok, registers, spill_bytes, error}."""
    arch, (module_name, kernel_name, signature, constexprs, num_warps) = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(f"agm_fast.kernels.{module_name}"), kernel_name)
    pointers = [i for i, ty in enumerate(signature.values()) if ty.startswith("*")]
    types = {k: v for k, v in signature.items() if v != "constexpr"}
    variant = " ".join([f"{k[:-4]}:{v[1:]}" for k, v in types.items() if k in ("pred_ptr", "x1_ptr", "x_ptr")]
                       + [f"{k}={v}" for k, v in constexprs.items()
                          if k not in ("BLOCK", "BF16_RNE_BY_BITS", "T_BLOCK_I", "T_BLOCK_J")]
                       + ([f"seeds:{types['seed_lo']}"] if "seed_lo" in types else []))
    row = {"kernel": kernel_name, "arch": f"sm_{arch}", "variant": variant}
    try:
        # torch allocations are 256-byte aligned, so on CUDA the runtime specialises every pointer
        # as 16-divisible: compile the same way (it changes vectorisation, hence the code)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                        attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            gpu = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
            res = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-400:]}")
        regs = re.search(r"Used (\d+) registers", res.stderr)
        spills = re.search(r"(\d+) bytes spill stores", res.stderr)
        row.update(ok=True, registers=int(regs.group(1)) if regs else None,
                   spill_bytes=int(spills.group(1)) if spills else 0)
    except Exception as e:  # report every failing variant, not only the first
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter never compiles kernels)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError as e:
        print(f"compile_check: triton is not installed ({e})", file=sys.stderr)
        return 2
    jobs = [(arch, v) for arch in args.arch for v in _variants()]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(_compile, jobs))
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"triton {triton.__version__}: {len(rows)} kernel variants")
        for r in rows:
            state = (f"{r['registers']:>3} regs, {r['spill_bytes']} B spilled" if r["ok"] else f"FAILED {r['error']}")
            print(f"  {r['arch']}  {r['kernel']:<30} {state:<26} {r['variant']}")
    failed = [r for r in rows if not r["ok"]]
    if failed and not args.json:
        print(f"compile_check: {len(failed)} of {len(rows)} variants failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
