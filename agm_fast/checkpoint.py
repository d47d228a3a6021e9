"""Every on-disk format of agm_fast (docs/design.md §4), and nothing else.

A run directory:
    config.json  run_info.json  train.log  metrics.jsonl  metrics.json  samples/  samples.png  loss.png
    checkpoints/ckpt-<step:08d>/            one complete training checkpoint per directory:
        drift.safetensors  potential.safetensors  ema.safetensors  optim.safetensors  state.json

A checkpoint is written into `ckpt-<step>.tmp/`, fsynced, then renamed into place: a kill at
any moment leaves either the previous checkpoint or the new one, never half of one. Weights
and optimiser tensors are safetensors, everything else JSON: loading never unpickles.

`ema.safetensors` is also the drift-only file the sampler reads (format agm_fast.drift.v1): the
EMA weights plus what sampling needs (drift_arch, predicts, σ, t-range, config, step). V_φ is
never in it. `drift_arch` / `potential_arch` record each net's constructor arguments; a
checkpoint whose records differ from the config is refused with the differing fields named.

Errors here are CheckpointError (a ValueError: a file or path the user can fix), one line,
naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import config as config_mod
from .config import CHOICES, Config
from .files import atomic_write

log = logging.getLogger("agm_fast")

CKPT_FORMAT = "agm_fast.checkpoint.v1"
DRIFT_FORMAT = "agm_fast.drift.v1"
CKPT_PREFIX = "ckpt-"
DRIFT_META_KEYS = ("format", "drift_arch", "predicts", "sigma", "t_min", "t_eps", "config", "step")
# what a run writes that a new run in the same directory would not all overwrite
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.json", "samples", "samples.png", "loss.png")


class CheckpointError(ValueError):
    """A checkpoint or drift file that cannot be used; the message names the file and why."""


# ----------------------------------------------------------------------------- architecture records

def drift_arch(cfg: Config) -> dict:
    """DriftUNet's constructor arguments for this config (stored with every checkpoint)."""
    m, d = cfg.model, cfg.data
    return dict(in_channels=d.channels, resolution=d.resolution, channels=m.channels,
                channel_mult=list(m.channel_mult), num_blocks=m.num_blocks,
                attn_resolutions=list(m.attn_resolutions), num_heads=m.num_heads,
                dropout=m.dropout, attention=m.attention, time_injection=m.time_injection,
                fused_norm=m.fused_norm)


# keys added to drift_arch after files were written without them, with the value that reproduces
# what those files ran: an older record is read as if it held these
DRIFT_ARCH_DEFAULTS = {"fused_norm": "off"}


def potential_arch(cfg: Config) -> dict:
    """PotentialNet's constructor arguments for this config."""
    p, d = cfg.potential, cfg.data
    return dict(in_channels=d.channels, resolution=d.resolution, channels=list(p.channels),
                time_input=p.time_input, film_dim=p.film_dim)


def check_arch(source, saved: dict, expected: dict, what: str) -> None:
    if all(k in expected for k in DRIFT_ARCH_DEFAULTS):  # a drift record: older files lack the newer keys
        saved = {**{k: v for k, v in DRIFT_ARCH_DEFAULTS.items() if k not in saved}, **saved}
    if saved != expected:
        diff = ", ".join(f"{k}: {saved.get(k)!r} there vs {expected.get(k)!r} here"
                         for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k))
        raise CheckpointError(f"{source}: {what} architecture differs from this config ({diff})")


# ----------------------------------------------------------------------------- run directory

def checkpoints(run_or_ckpt_dir) -> list[Path]:
    """Complete checkpoints of a run directory (or its checkpoints/ folder), oldest first; a
    `.tmp` save killed before its rename is not one."""
    d = Path(run_or_ckpt_dir)
    d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
                  and not p.name.endswith(".tmp") and (p / "state.json").exists())


def latest(run_dir) -> Path | None:
    done = checkpoints(Path(run_dir) / "checkpoints")
    return done[-1] if done else None


def newest_checkpoint(path) -> Path:
    """A run directory → its newest complete checkpoint directory; any other path as given."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        done = checkpoints(p)
        if not done:
            raise FileNotFoundError(f"{path}: run directory without a complete checkpoint")
        return done[-1]
    return p


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CKPT_PREFIX}{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / "state.json").exists()


def ema_path(path) -> str:
    """A run directory (its newest complete checkpoint), a checkpoint directory or an
    ema.safetensors file → the path of the EMA drift file."""
    p = newest_checkpoint(path)
    if p.is_dir():
        p = p / "ema.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (give a run directory, a checkpoint directory or ema.safetensors)")
    return str(p)


def set_aside_previous_run(run_dir) -> Path | None:
    """--no-resume: move the previous run's outputs into replaced-<time>/. Left in place, an
    older run's later checkpoints sort after the new run's, so keep_ckpts would prune the new
    ones and sampling or resuming would pick up the old model."""
    run_dir = Path(run_dir)
    old = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"replaced-{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"replaced-{stamp}-{n}"
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    log.warning("--no-resume: moved the previous run's %s to %s", ", ".join(p.name for p in old), dest)
    return dest


# ----------------------------------------------------------------------------- tensors and optimiser state

def _cpu_tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


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


def load_tensors(path, device, into: torch.nn.Module | None = None) -> dict:
    """safetensors → tensors on device (optionally loaded into a module); any failure (missing,
    truncated or corrupt file, mismatched keys) is one CheckpointError naming the file."""
    try:
        tensors = load_file(path, device=str(device))
        if into is not None:
            into.load_state_dict(tensors)
        return tensors
    except Exception as e:  # safetensors raises its own error type; torch a RuntimeError
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}: not a readable agm_fast checkpoint ({e})") from None
    if state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{ckpt}: unknown checkpoint format {state.get('format')!r}")
    return state


# ----------------------------------------------------------------------------- training checkpoints

def save(run_dir, *, step: int, cfg: Config, drift, potential, ema, opt_f, opt_v, nonfinite: int) -> Path:
    """Write checkpoints/ckpt-<step>/ atomically (a .tmp directory, fsync, rename), then keep
    only the newest train.keep_ckpts. A complete checkpoint at this step is left as it is."""
    final = checkpoint_dir(run_dir, step)
    if is_complete(final):
        # a stop right after a periodic save, or a rerun of a finished run: the state is the
        # same, and replacing it would open a window in which a kill leaves none at this step
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg_dict = config_mod.to_dict(cfg)
    meta = {"format": CKPT_FORMAT, "step": str(step)}
    save_file(_cpu_tensors(drift), tmp / "drift.safetensors", metadata=meta)
    save_file(_cpu_tensors(potential), tmp / "potential.safetensors", metadata=meta)
    save_drift(tmp / "ema.safetensors", ema.state_dict(), drift_arch(cfg), predicts=cfg.model.predicts,
               sigma=cfg.bridge.sigma, t_min=cfg.bridge.t_min, t_eps=cfg.bridge.t_eps, config=cfg_dict, step=step)
    tf, gf = _optim_tensors("drift", opt_f)
    tv, gv = _optim_tensors("potential", opt_v)
    save_file({**tf, **tv}, tmp / "optim.safetensors", metadata=meta)
    state = {"format": CKPT_FORMAT, "step": step, "nonfinite": nonfinite, "seed": cfg.train.seed,
             "data_position": {"global_sample": step * cfg.train.batch_size},
             "config": cfg_dict, "drift_arch": drift_arch(cfg), "potential_arch": potential_arch(cfg),
             "optim_groups": {"drift": gf, "potential": gv}}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a directory without state.json: not a checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    for p in checkpoints(final.parent)[: -cfg.train.keep_ckpts]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load(ckpt: Path, *, cfg: Config, drift, potential, ema, opt_f, opt_v, device) -> dict:
    """Load a training checkpoint into the nets and optimisers; returns its state.json."""
    state = read_state(ckpt)
    try:
        try:
            check_arch(ckpt, state["drift_arch"], drift_arch(cfg), "drift net")
            check_arch(ckpt, state["potential_arch"], potential_arch(cfg), "potential net")
        except CheckpointError as e:  # most often a new experiment pointed at an old run directory
            raise CheckpointError(f"{e}; to start a new run, give another train.run_dir or --no-resume") from None
        load_tensors(ckpt / "drift.safetensors", device, drift)
        load_tensors(ckpt / "potential.safetensors", device, potential)
        load_tensors(ckpt / "ema.safetensors", device, ema)
        opt = load_tensors(ckpt / "optim.safetensors", device)
        _load_optim(opt_f, "drift", opt, state["optim_groups"]["drift"])
        _load_optim(opt_v, "potential", opt, state["optim_groups"]["potential"])
        state["step"], state["nonfinite"] = int(state["step"]), int(state["nonfinite"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a state.json or optimiser state that does not fit
        raise CheckpointError(f"{ckpt}: damaged checkpoint ({type(e).__name__}: {e}); "
                              "delete it to resume from the one before") from None
    return state


def init_from(source, *, cfg: Config, drift, ema, potential, device) -> None:
    """Fine-tuning start: weights (drift, EMA and, from a checkpoint whose V_φ fits, V_φ) from a
    run directory, a checkpoint directory or an EMA file; the optimisers and step start fresh."""
    try:
        src = newest_checkpoint(source)
    except FileNotFoundError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    if src.is_dir():
        state = read_state(src)
        check_arch(src, state.get("drift_arch", {}), drift_arch(cfg), "drift net")
        load_tensors(src / "drift.safetensors", device, drift)
        load_tensors(src / "ema.safetensors", device, ema)
        with_potential = state.get("potential_arch") == potential_arch(cfg)
        if with_potential:
            load_tensors(src / "potential.safetensors", device, potential)
    elif src.suffix == ".safetensors" and src.exists():
        meta = read_drift_meta(src)
        check_arch(src, meta["drift_arch"], drift_arch(cfg), "drift net")
        weights = load_tensors(src, device, drift)
        ema.load_state_dict(weights)
        with_potential = False
    else:
        raise CheckpointError(f"train.init_from={source!r}: expected a run directory, a checkpoint "
                              "directory or an EMA .safetensors file")
    log.info("initialised weights from %s (%s)", src, "drift, EMA and V_φ" if with_potential else
             "drift and EMA; V_φ starts fresh: " + ("an EMA file holds none" if src.is_file()
                                                    else "its architecture differs"))


# ----------------------------------------------------------------------------- the EMA drift file

def save_drift(path, state_dict: dict, drift_arch: dict, *, predicts: str, sigma: float, t_min: float,
               t_eps: float, config: dict, step: int) -> None:
    """Write EMA drift weights + metadata (format agm_fast.drift.v1) as safetensors, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": DRIFT_FORMAT, "drift_arch": json.dumps(drift_arch, sort_keys=True), "predicts": predicts,
            "sigma": repr(float(sigma)), "t_min": repr(float(t_min)), "t_eps": repr(float(t_eps)),
            "config": json.dumps(config, sort_keys=True), "step": str(int(step))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_drift_meta(path) -> dict:
    """Metadata of a drift file, parsed: drift_arch and config as dicts, numbers as numbers."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"drift checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; pass the .safetensors file of EMA drift weights")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            n_tensors = len(list(f.keys()))
    except Exception as err:
        raise CheckpointError(f"{path} is not an agm_fast drift checkpoint (not a safetensors file: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if raw.get("format") != DRIFT_FORMAT:
        raise CheckpointError(f"{path} is not an agm_fast drift checkpoint (metadata format={raw.get('format')!r}, "
                              f"expected {DRIFT_FORMAT!r})")
    if n_tensors == 0:
        raise CheckpointError(f"{path} holds no EMA drift weights")
    try:
        missing = [k for k in DRIFT_META_KEYS if k not in raw]
        if missing:
            raise KeyError(f"it lacks {', '.join(missing)}")
        meta = {"format": raw["format"], "drift_arch": json.loads(raw["drift_arch"]), "predicts": raw["predicts"],
                "sigma": float(raw["sigma"]), "t_min": float(raw["t_min"]), "t_eps": float(raw["t_eps"]),
                "config": json.loads(raw["config"]), "step": int(raw["step"])}
        if not isinstance(meta["drift_arch"], dict) or not isinstance(meta["config"], dict):
            raise TypeError("drift_arch and config must be JSON objects")
        if meta["predicts"] not in CHOICES["model.predicts"]:
            raise ValueError(f"predicts={meta['predicts']!r} is not one of {CHOICES['model.predicts']}")
        if not {"in_channels", "resolution"} <= set(meta["drift_arch"]):
            raise KeyError("drift_arch lacks in_channels or resolution: the image shape is unknown")
    except (KeyError, ValueError, TypeError) as err:
        detail = err.args[0] if isinstance(err, KeyError) else err
        raise CheckpointError(f"{path}: unreadable drift checkpoint metadata ({detail})") from None
    return meta


def drift_image_shape(meta: dict) -> tuple[int, int, int]:
    """(C, H, W) the file's drift net was built for, from drift_arch's in_channels and resolution."""
    arch = meta["drift_arch"]  # read_drift_meta checked that it has both
    res = arch["resolution"]
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    return int(arch["in_channels"]), int(h), int(w)


def build_drift_net(drift_arch: dict) -> torch.nn.Module:
    """DriftUNet(**drift_arch); tests replace this function to use a stand-in network."""
    from .models import DriftUNet
    return DriftUNet(**{**DRIFT_ARCH_DEFAULTS, **drift_arch})


def load_drift(path, device="cpu", meta: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """(EMA drift net in eval mode on device, parsed metadata). V_φ is never loaded.
    meta: read_drift_meta(path) when the caller has it already."""
    meta = read_drift_meta(path) if meta is None else meta
    try:
        net = build_drift_net(meta["drift_arch"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: drift_arch {meta['drift_arch']} does not build the drift net: {err}") from None
    weights = load_file(os.fspath(path), device="cpu")
    expected = net.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs net {tuple(v.shape)}"
             for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        raise CheckpointError(f"{path}: the EMA weights do not fit the drift net built from drift_arch: "
                              + "; ".join(parts))
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False), meta
