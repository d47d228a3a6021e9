"""agm-fast train | sample | prepare | eval | saliency | info.

Errors a user can fix (bad config, missing files, refused options) print one line and exit 2;
AGM_FAST_DEBUG=1 shows the traceback instead.

`torchrun --nproc_per_node N -m agm_fast.cli train ...` trains on N processes
(agm_fast.distributed): rank 0 logs to the console and train.log; the other ranks print only
warnings and errors, prefixed with their rank; the process group is left on every exit path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from .config import CHOICES, Config

_SAMPLE = Config().sample  # the CLI's sampling defaults are the config's

log = logging.getLogger("agm_fast")


def _setup_logging(run_dir: str | None = None, rank: int = 0) -> None:
    """Rank 0 (or the only process): INFO to stderr and run_dir/train.log. Other ranks: warnings
    and errors to stderr only, prefixed with the rank."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    prefix = f"[rank {rank}] " if rank else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


_RANK_PREFIX = ""  # "(rank N) " in the error line of a non-zero rank of a torchrun launch


def cmd_train(args) -> int:
    global _RANK_PREFIX
    from . import config, dispatch, distributed
    from .trainer import Trainer

    cfg = config.load(args.preset, args.set)
    dist = None
    try:
        if distributed.launched():
            rank = int(os.environ["RANK"])
            _RANK_PREFIX = f"(rank {rank}) " if rank else ""
            _setup_logging(cfg.train.run_dir, rank)
            dist = distributed.setup(dispatch.resolve_device(cfg.train.device, "train.device"))
        else:
            _setup_logging(cfg.train.run_dir)
        trainer = Trainer(cfg, resume=not args.no_resume, dist=dist)
        result = trainer.run()
    except Exception as e:
        if distributed.launched():  # torchrun's failure summary then shows this rank's error
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler
            get_error_handler().record_exception(e)
        raise
    finally:  # every exit path leaves the process group: no hang of the others, no abort at exit
        distributed.teardown()
    if dist is not None and not dist.is_main:
        return 0
    if result["stopped_by"]:
        print(f"stopped by {result['stopped_by']} at step {result['step']}; resume with the same command "
              f"(checkpoint {result['checkpoint']})")
    else:
        print(f"done: {result['step']} steps; run directory {cfg.train.run_dir}")
    return 0


def cmd_sample(args) -> int:
    from .sampler import sample_from_checkpoint

    _setup_logging()
    if not args.out and not args.npz:
        raise ValueError("give --out PNG and/or --npz FILE for the samples")
    sample_from_checkpoint(args.ckpt, n=args.n, steps=args.steps, sigma=args.sigma,
                           seed=args.seed, em=args.em, batch_size=args.batch_size, device=args.device,
                           bf16=args.bf16, compile=args.compile, cuda_graph=args.cuda_graph,
                           out_png=args.out, out_npz=args.npz, nrow=args.nrow)
    for p in (args.out, args.npz):
        if p:
            print(f"wrote {p}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, summary_lines

    _setup_logging()
    result = evaluate(args.ckpt, args.data, args.n, backbone=args.backbone, inception_weights=args.inception_weights,
                      steps=args.steps, seed=args.seed, real_seed=args.real_seed, batch_size=args.batch_size,
                      device=args.device, em=args.em, bf16=args.bf16, out_json=args.out_json, out_png=args.out_png,
                      cache_dir=args.cache_dir)
    print("\n".join(summary_lines(result)))
    return 0


def cmd_saliency(args) -> int:
    from .evaluate import saliency

    _setup_logging()
    result = saliency(args.ckpt, args.data, n_columns=args.n_columns, out_png=args.out, seed=args.seed,
                      device=args.device, scale=args.scale, out_json=args.out_json)
    print(f"wrote {result['png']} ({result['rows']} rows t = {', '.join(f'{t:g}' for t in result['t'])} × "
          f"{result['columns']} bridges; each cell x_t | |∇x V_φ|)")
    return 0


def cmd_info(args) -> int:
    from . import __version__, dispatch

    device = dispatch.resolve_device(args.device, "--device")
    print(f"agm_fast {__version__} on {device}")
    print(json.dumps(dispatch.package_versions()))
    for name, (impl, why) in dispatch.describe(device).items():
        print(f"  {name:<16} {impl:<12} {why}")
    return 0


def cmd_prepare(args) -> int:
    from . import prepare
    _setup_logging()
    return prepare.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agm-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train AGM (or the drift-only baseline with weights.scheme=uniform)")
    t.add_argument("--preset", default="demo32", help="configs/<NAME>.toml or a path to a .toml file")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable), e.g. --set train.steps=1000")
    t.add_argument("--no-resume", action="store_true",
                   help="start from step 0; a previous run's checkpoints and metrics in the run "
                        "directory are moved to replaced-<time>/ first")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample images from a run's EMA drift (V_φ is never loaded)")
    s.add_argument("ckpt", help="run directory, checkpoint directory or ema.safetensors")
    s.add_argument("--n", type=int, default=64, help="number of images")
    s.add_argument("--out", help="PNG grid to write")
    s.add_argument("--npz", help=".npz of uint8 NHWC images to write")
    s.add_argument("--nrow", type=int, default=None, help="images per grid row")
    s.add_argument("--steps", type=int, default=None, help="Euler–Maruyama steps (default: the run's sample.steps)")
    s.add_argument("--sigma", type=float, default=None, help="must equal the checkpoint's bridge.sigma if given")
    s.add_argument("--seed", type=int, default=_SAMPLE.seed, help="keys all sampling noise")
    s.add_argument("--em", default=_SAMPLE.em, choices=CHOICES["sample.em"],
                   help="Euler–Maruyama step: the fused C++/CUDA op (ext), the PyTorch reference, or auto")
    s.add_argument("--batch-size", type=int, default=_SAMPLE.batch_size,
                   help="images per batch (the images do not depend on it)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=_SAMPLE.bf16,
                   help="bf16 autocast when sampling on CUDA (the CPU samples in fp32)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=_SAMPLE.compile,
                   help="torch.compile the drift net")
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=_SAMPLE.cuda_graph,
                   help="capture one step as a CUDA graph")
    s.set_defaults(fn=cmd_sample)

    r = sub.add_parser("prepare", help="write a training folder of R×R PNGs + manifest.json from an image folder, "
                                       "Fashion-MNIST or the emoji package")
    from . import prepare
    prepare.add_arguments(r)
    r.set_defaults(fn=cmd_prepare)

    e = sub.add_parser("eval", help="FD (FID with --inception-weights, else FD-EffLite0), KID, precision/recall/"
                                    "density/coverage and sliced Wasserstein of EMA samples against a dataset")
    e.add_argument("ckpt", help="run directory, checkpoint directory or ema.safetensors")
    e.add_argument("--data", required=True, help="dataset folder (prepared by agm-fast prepare, or any image folder)")
    e.add_argument("--n", type=int, default=1000, help="samples drawn, and real images compared (a seeded random "
                                                       "subset when the set is larger); at least 6")
    e.add_argument("--backbone", choices=("inception", "efflite0"), default=None,
                   help="feature network: inception (FID; needs --inception-weights) or efflite0 (FD-EffLite0); "
                        "default: inception when --inception-weights is given, else efflite0")
    e.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="the standard FID Inception-v3 weights (pt_inception-2015-12-05-*.pth or .safetensors)")
    e.add_argument("--steps", type=int, default=None, help="Euler–Maruyama steps (default: the run's sample.steps)")
    e.add_argument("--seed", type=int, default=_SAMPLE.seed, help="keys the sampling noise and KID's subsets")
    e.add_argument("--real-seed", type=int, default=0, help="picks the subset of real images (default 0)")
    e.add_argument("--batch-size", type=int, default=_SAMPLE.batch_size,
                   help="images per sampling and feature batch")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--em", default=_SAMPLE.em, choices=CHOICES["sample.em"], help="Euler–Maruyama step implementation")
    e.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=_SAMPLE.bf16,
                   help="bf16 autocast when sampling on CUDA (features are always fp32)")
    e.add_argument("--out-json", default=None, help="default: <run>/eval/eval-step<step>-<backbone>-n<N>-seed<K>.json")
    e.add_argument("--out-png", default=None, help="samples beside real images; default: the JSON's name with .png")
    e.add_argument("--cache-dir", default=None,
                   help="dataset feature cache (default: $AGM_FAST_CACHE/features or ~/.cache/agm_fast/features)")
    e.set_defaults(fn=cmd_eval)

    v = sub.add_parser("saliency", help="|∇x V_φ(x_t, t)| of the potential on bridge samples (rows t = 0.1…0.9, "
                                        "columns = bridges) as a PNG")
    v.add_argument("ckpt", help="run directory or training checkpoint directory (V_φ is not in ema.safetensors)")
    v.add_argument("--data", required=True, help="dataset folder whose images end the bridges")
    v.add_argument("--n-columns", type=int, default=8, help="independent bridges (columns)")
    v.add_argument("--out", default=None, help="PNG to write (default: <run>/eval/saliency-step<step>.png)")
    v.add_argument("--out-json", default=None, help="also write the layout and per-t mean saliency as JSON")
    v.add_argument("--seed", type=int, default=0, help="picks the images and keys the bridge noise")
    v.add_argument("--scale", type=int, default=None, help="integer upscaling of each tile (default: tiles ≥ 64 px)")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    v.set_defaults(fn=cmd_saliency)

    i = sub.add_parser("info", help="which implementations and backends are active, and why")
    i.add_argument("--device", default="auto")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C while sampling (training handles it itself): no traceback
        print(f"agm-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which exited: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        from .trainer import TrainingError
        user_error = isinstance(e, (ValueError, OSError, TrainingError))
        if os.environ.get("AGM_FAST_DEBUG") or not user_error:
            raise
        print(f"agm-fast {args.command}: {_RANK_PREFIX}error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
