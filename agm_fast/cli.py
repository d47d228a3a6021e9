"""agm-fast train | sample | info.

Errors a user can fix (bad config, missing files, refused options) print one line and exit 2;
AGM_FAST_DEBUG=1 shows the traceback instead.
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


def _setup_logging(run_dir: str | None = None) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def cmd_train(args) -> int:
    from . import config
    from .trainer import Trainer

    cfg = config.load(args.preset, args.set)
    _setup_logging(cfg.train.run_dir)
    trainer = Trainer(cfg, resume=not args.no_resume)
    result = trainer.run()
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


def cmd_info(args) -> int:
    from . import __version__, dispatch

    device = dispatch.resolve_device(args.device, "--device")
    print(f"agm_fast {__version__} on {device}")
    print(json.dumps(dispatch.package_versions()))
    for name, (impl, why) in dispatch.describe(device).items():
        print(f"  {name:<16} {impl:<12} {why}")
    return 0


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
        print(f"agm-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
