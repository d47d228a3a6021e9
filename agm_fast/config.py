"""Configuration: nested dataclasses, named presets (configs/*.toml) and `--set a.b=value` overrides.

Every interpretation docs/design.md §1 makes where the paper is silent is a field here, so a
researcher can swap it without touching kernels. Errors are one line and name the field and
what is allowed (ConfigError).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import checks

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


# Each field declares its default, and where it has them its allowed values (choice) or range
# (num: [lo, hi] with open ends marked; inf_off: +inf means "off"). CHOICES and RANGES below are
# read off these declarations; the README's configuration table is tested against them.

def choice(default: str, allowed: tuple[str, ...]):
    return field(default=default, metadata={"choices": tuple(allowed)})


def num(default, lo=None, hi=None, *, lo_open=False, hi_open=False, inf_off=False):
    return field(default=default, metadata={"range": (lo, hi, not lo_open, not hi_open), "inf_off": inf_off})


def int_list(default: list, *, min_len: int, max_len: int | None = None, lo: int = 1):
    return field(default_factory=lambda: list(default), metadata={"int_list": (min_len, max_len, lo)})


@dataclass
class DataConfig:
    dataset: str = choice("shapes", ("shapes", "folder"))  # shapes (embedded procedural) | folder (images under data.path)
    path: str = ""                     # image folder for dataset=folder (searched recursively)
    resolution: int = num(32, 4, 4096)  # images are centre-cropped and resized to this square size
    channels: int = field(default=3, metadata={"values": {1: "grey", 3: "RGB"}})  # image channels
    num_images: int = num(20000, 1)    # size of the procedural dataset (dataset=shapes)
    hflip: bool = False                # random horizontal flips (keyed noise, so resume is exact)
    loader: str = choice("auto", ("auto", "torch", "memory", "dali"))  # auto | torch | memory | dali (README "Data loaders")
    memory_budget_gb: float = num(4.0, 0)  # the most GB of images loader=memory keeps on the training device; auto picks memory when the set fits
    workers: int = num(0, 0, 64)       # DataLoader worker processes; DALI CPU threads and memory decode threads (0: up to 4)


@dataclass
class ModelConfig:
    channels: int = num(64, 2)         # base channel count of the drift U-Net (≥ 2: the sinusoidal embedding)
    channel_mult: list = int_list([1, 2, 2], min_len=1)  # per-level multipliers
    num_blocks: int = num(1, 1)        # residual blocks per level
    attn_resolutions: list = int_list([8], min_len=0)    # feature sizes with attention
    num_heads: int = num(4, 1)         # attention heads
    dropout: float = num(0.0, 0, 1, hi_open=True)  # dropout in residual blocks
    attention: str = choice("auto", checks.ATTENTION)     # auto | xformers | sdpa | math
    time_injection: str = choice("add", checks.TIME_INJECTIONS)  # add (GN(h) + e(t)) | scale_shift (ADM: GN(h)·(1 + s) + b)
    predicts: str = choice("drift", checks.PREDICTS)     # drift | x1 (drift = (x̂1 - x_t)/(1-t), loss on x1)
    fused_norm: str = choice("off", checks.FUSED_NORMS)  # off | triton | auto (fused GroupNorm + SiLU (+ time) kernel; auto = triton on CUDA)
    channels_last: bool = False        # NHWC activations end to end in the drift U-Net (inputs, convs, norms, attention, loss)
    checkpointing: bool = False        # recompute the drift U-Net's residual blocks in backward (less activation memory)


@dataclass
class PotentialConfig:
    channels: list = int_list([16, 32, 64], min_len=3, max_len=3)  # the three stride-2 convs
    time_input: str = choice("channel", checks.TIME_INPUTS)  # channel (t as a constant input channel) | film
    film_dim: int = num(32, 2)         # width of the t-embedding feeding FiLM (time_input=film)
    margin: float = num(1.0, 0, lo_open=True)  # hinge margin m of paper Eq. 10
    negatives: str = choice("pixel_shuffle", checks.NEGATIVES)  # pixel_shuffle | patch_shuffle | noise
    patch: int = num(4, 1)             # tile size for negatives=patch_shuffle


@dataclass
class BridgeConfig:
    sigma: float = num(0.5, 0)         # bridge noise σ; 0 = rectified flow (ODE sampling)
    t_min: float = num(0.0, 0, 1, hi_open=True)  # t ~ U[t_min, 1 - t_eps]
    t_eps: float = num(1e-3, 0, 1, lo_open=True, hi_open=True)  # keeps t away from 1 where the drift target blows up


@dataclass
class WeightsConfig:
    scheme: str = choice("softmax", checks.SCHEMES)     # softmax (AGM) | uniform (drift-only baseline, w ≡ 1)
    favour: str = choice("coherent", checks.FAVOURS)    # coherent (w ∝ e^(-s/τ), low V) | degenerate (focal-style)
    tau: float = num(1.0, 0, lo_open=True)             # softmax temperature τ
    clip: float = num(2.0, 0, lo_open=True, inf_off=True)  # clamp of standardised V to ±c (inf = off); max/min w ≤ e^(2c/τ)
    normalise: str = choice("batch", checks.NORMALISE)  # batch (standardise V over the batch) | t_bins (within t-quantile bins)
    t_bins: int = num(4, 1)            # t-quantile bins K of the optimiser batch for normalise=t_bins


@dataclass
class OptimConfig:
    lr: float = num(2e-4, 0, lo_open=True)            # AdamW learning rate of the drift net f_θ
    lr_potential: float = num(1e-4, 0, lo_open=True)  # AdamW learning rate of the potential V_φ
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW β1, β2 (both nets)
    weight_decay: float = num(0.0, 0)  # AdamW decoupled weight decay (both nets)
    warmup_steps: int = num(200, 0)    # linear LR warm-up
    schedule: str = choice("constant", ("constant", "cosine"))  # constant | cosine (decay to 0 at train.steps)
    grad_clip: float = num(1.0, 0, inf_off=True)  # global grad-norm clip per net (0 = off)
    impl: str = choice("auto", checks.ADAMW_IMPLS)  # auto | for_loop | foreach | fused (torch AdamW implementation; auto: fused on CUDA, for_loop on CPU)


@dataclass
class EmaConfig:
    halflife_kimg: float = num(10.0, 0)  # EMA half-life in thousands of images (EDM)


@dataclass
class TrainConfig:
    steps: int = num(2000, 1)          # optimiser steps
    batch_size: int = num(32, 1)       # images per optimiser step, all micro-batches
    micro_batch: int = num(0, 0)       # images per forward pass (0 = whole batch)
    seed: int = num(0, 0, 2**63 - 1)   # keys all training noise and the data order
    kernels: str = choice("auto", ("auto", "torch", "triton"))  # auto | torch | triton (bridge sampling and fused loss)
    precision: str = choice("auto", ("auto", "fp32", "bf16"))  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    run_dir: str = "runs/default"      # checkpoints, logs, plots, samples
    log_every: int = num(10, 1)        # steps between log lines (console and train.log); metrics.jsonl gets every step
    sample_every: int = num(500, 0)    # steps between sample grids, plus one at the end (0 = off)
    sample_grid: int = num(64, 1, 1024)  # images in each grid
    eval_images: int = num(256, 0)     # images for the end-of-run quality number (0 = off)
    eval_every: int = num(0, 0)        # steps between evaluations during training: FD-EffLite0, KID, SWD of train.eval_n samples to metrics.jsonl (0 = off)
    eval_n: int = num(256, 6)          # samples (and reference images) per evaluation during training
    ckpt_every: int = num(500, 0)      # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = num(2, 1)        # checkpoints kept on disk
    init_from: str = ""                # checkpoint dir or .safetensors to fine-tune from
    max_nonfinite: int = num(10, 0)    # non-finite losses skipped before the run stops
    deterministic: bool = False        # torch deterministic algorithms (exact-resume tests)
    threads: int = num(0, 0, 256)      # torch CPU threads (0 = torch default)
    compile: str = choice("off", checks.COMPILE_MODES)  # off | nets (torch.compile both nets) | step (the whole AGM iteration)
    cuda_graph: bool = False           # capture the whole training step as one CUDA graph (CUDA only)
    progress: bool = True              # tqdm progress bar


@dataclass
class SampleConfig:
    steps: int = num(200, 1)           # Euler–Maruyama steps N (paper: 200); needs t_eps ≤ 1/N
    em: str = choice("auto", ("auto", "torch", "ext"))  # auto | torch | ext (fused C++/CUDA step)
    cuda_graph: bool = False           # capture one sampling step as a CUDA graph
    compile: bool = False              # torch.compile the drift net for sampling
    bf16: bool = True                  # bf16 autocast when sampling on CUDA (the CPU samples in fp32)
    batch_size: int = num(64, 1)       # images per sampling batch
    seed: int = num(0, 0, 2**63 - 1)   # keys the sampler's noise


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    potential: PotentialConfig = field(default_factory=PotentialConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _declared(key: str) -> dict:
    return {f"{name}.{f.name}": f.metadata[key] for name, section in _SECTIONS.items()
            for f in dataclasses.fields(section) if key in f.metadata}


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "potential": PotentialConfig, "bridge": BridgeConfig,
             "weights": WeightsConfig, "optim": OptimConfig, "ema": EmaConfig, "train": TrainConfig,
             "sample": SampleConfig}
CHOICES: dict[str, tuple[str, ...]] = _declared("choices")
RANGES: dict[str, tuple] = _declared("range")      # (low, high, low inclusive, high inclusive); None = unbounded
INT_LISTS: dict[str, tuple] = _declared("int_list")  # (min length, max length or None, lowest value)
INF_MEANS_OFF = tuple(k for k, off in _declared("inf_off").items() if off)
INT_VALUES: dict[str, dict[int, str]] = _declared("values")  # integer fields with named values


def check_choice(key: str, value) -> str:
    """value if it is one of CHOICES[key], else a ConfigError naming the field and what is allowed."""
    allowed = CHOICES[key]
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


# ----------------------------------------------------------------------------- introspection

def _sections(cfg: Config):
    for f in dataclasses.fields(cfg):
        yield f.name, getattr(cfg, f.name)


def field_names(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{s}.{f.name}" for s, sec in _sections(cfg) for f in dataclasses.fields(sec)]


def allowed_text(key: str) -> str:
    """What a field accepts, as the README's configuration table states it."""
    if key in CHOICES:
        return " \\| ".join(CHOICES[key])
    if key in RANGES:
        lo, hi, lo_inc, hi_inc = RANGES[key]
        text = f"{'[' if lo_inc else '('}{lo}, {'∞' if hi is None else hi}{']' if hi_inc else ')'}"
        return text + " or inf (off)" if key in INF_MEANS_OFF else text
    if key in INT_VALUES:
        return " \\| ".join(f"{v} ({name})" for v, name in INT_VALUES[key].items())
    if key in INT_LISTS:
        min_len, max_len, lo = INT_LISTS[key]
        size = f"{min_len}" if max_len == min_len else f"≥ {min_len}"
        return f"{size} ints ≥ {lo}"
    return ""


def _field_type(section, name: str):
    hints = typing.get_type_hints(type(section))
    return hints[name]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=1, default=_json_default)


def _json_default(x):
    raise TypeError(f"not JSON-serialisable: {x!r}")


# ----------------------------------------------------------------------------- setting values

def _coerce(key: str, value, typ):
    """Convert a TOML/JSON/CLI value to the field's type, or raise ConfigError naming the key."""
    if isinstance(value, str) and typ is not str:
        value = _parse_cli_value(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if typ is list:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}")
        return list(value)
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _parse_cli_value(text: str):
    """`--set` values: JSON/TOML-ish literals (numbers, true/false, [lists], inf), else a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("inf", "+inf", "infinity", "+infinity"):
        return math.inf
    if low in ("-inf", "-infinity"):  # so that the range check, not "expected a number", refuses it
        return -math.inf
    if low == "nan":
        return math.nan
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def set_value(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    sections = dict(_sections(cfg))
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key {key!r}; sections are: {', '.join(sections)}")
    sec = sections[parts[0]]
    names = [f.name for f in dataclasses.fields(sec)]
    if parts[1] not in names:
        raise ConfigError(f"unknown config key {key!r}; {parts[0]}.* fields are: {', '.join(names)}")
    setattr(sec, parts[1], _coerce(key, value, _field_type(sec, parts[1])))


def update(cfg: Config, nested: dict, prefix: str = "") -> None:
    """Apply a nested dict (from TOML or JSON) onto cfg."""
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if prefix:
                raise ConfigError(f"unknown config key {key!r}: sections do not nest")
            update(cfg, v, f"{k}.")
        else:
            if not prefix:
                raise ConfigError(f"config key {key!r} must be inside a section like [train]")
            set_value(cfg, key, v)


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip(), value


# ----------------------------------------------------------------------------- presets

def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    if p.suffix == ".toml":
        raise ConfigError(f"preset file {name!r} does not exist")
    q = CONFIG_DIR / f"{name}.toml"
    if q.exists():
        return q
    raise ConfigError(f"unknown preset {name!r}: give a .toml file or one of {', '.join(preset_names())}")


def load(preset: str | None = None, overrides: list[str] | tuple = (), extra: dict | None = None) -> Config:
    """Defaults ← preset file ← `extra` dict ← `section.field=value` overrides; then validate."""
    cfg = Config()
    if preset:
        path = preset_path(preset)
        try:
            update(cfg, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if extra:
        update(cfg, extra)
    for text in overrides:
        set_value(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def from_dict(d: dict) -> Config:
    cfg = Config()
    update(cfg, d)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

def _get(cfg: Config, key: str):
    s, f = key.split(".")
    return getattr(getattr(cfg, s), f)


def validate(cfg: Config) -> None:
    for key in CHOICES:
        check_choice(key, _get(cfg, key))
    for key, (lo, hi, lo_inc, hi_inc) in RANGES.items():
        v = _get(cfg, key)
        if isinstance(v, float) and math.isnan(v):
            raise ConfigError(f"{key} is NaN")
        if isinstance(v, float) and math.isinf(v) and key not in INF_MEANS_OFF:
            # e.g. optim.lr=inf trained NaN weights to the end and saved them as "done"
            raise ConfigError(f"{key}={v!r} must be finite")
        bad_lo = lo is not None and (v < lo if lo_inc else v <= lo)
        bad_hi = hi is not None and (v > hi if hi_inc else v >= hi)
        if bad_lo or bad_hi:
            left = "[" if lo_inc else "("
            right = "]" if hi_inc else ")"
            raise ConfigError(f"{key}={v!r} is out of range {left}{lo}, {'∞' if hi is None else hi}{right}")
    for key, values in INT_VALUES.items():
        v = _get(cfg, key)
        if isinstance(v, bool) or v not in values:
            raise ConfigError(f"{key}={v!r}: expected " + " or ".join(f"{k} ({name})" for k, name in values.items()))
    for key, (min_len, max_len, lo) in INT_LISTS.items():
        v = _get(cfg, key)
        if (not all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v)
                or len(v) < min_len or (max_len is not None and len(v) > max_len)):
            size = f"exactly {min_len}" if max_len == min_len else f"at least {min_len}"
            raise ConfigError(f"{key}={v!r}: expected a list of {size} integers ≥ {lo}")
    o, t = cfg.optim, cfg.train
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas!r}: expected two numbers in [0, 1)")
    if cfg.bridge.t_min >= 1 - cfg.bridge.t_eps:
        raise ConfigError("bridge.t_min must be below 1 - bridge.t_eps")
    if cfg.bridge.t_eps > 1.0 / cfg.sample.steps:
        raise ConfigError(f"bridge.t_eps={cfg.bridge.t_eps} must be ≤ 1/sample.steps={1 / cfg.sample.steps:.3g}: "
                          "the sampler's last grid point must lie inside the trained t-range")
    if t.micro_batch and t.batch_size % t.micro_batch:
        raise ConfigError(f"train.micro_batch={t.micro_batch} must divide train.batch_size={t.batch_size}")
    if not t.run_dir.strip():  # "" would scatter checkpoints and logs over the working directory
        raise ConfigError("train.run_dir must name a directory")
    if cfg.data.dataset == "folder" and not cfg.data.path:
        raise ConfigError("data.path must name an image folder when data.dataset=folder")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r}: use auto, cpu, cuda or cuda:N")
