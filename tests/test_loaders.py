"""data.loader = torch | memory | dali | auto (agm_fast/data.py, memory.py, dali.py): one stream.

The torch loader is the reference. Tolerance against it: memory is exact everywhere; DALI is
exact on a prepared folder (PNG decoding is lossless and no resize is needed), within one grey
level (2/255 in [-1, 1]) where colour files are read as grey, and within a few grey levels
(mean under one) on an unprepared folder of JPEGs and other sizes, whose decoding and Lanczos
resize are DALI's own. DALI runs its CPU graph here (device_id=None); AGM_FAST_REQUIRE=dali
turns a missing DALI into a failure.
"""

import itertools
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from agm_fast import config, dali, data, prepare
from agm_fast.config import ConfigError
from tests.conftest import needs_cuda, skip_unless_available

N, R = 23, 16           # 23 files: batches of 6 cross every epoch boundary at another offset
GREY_LEVEL = 2.0 / 255.0
LOADERS = ["torch", "memory", "dali"]
TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
        "model.num_heads=2", "potential.channels=[4,8,8]", "train.sample_every=0",
        "train.eval_images=0", "train.progress=false", "train.deterministic=true",
        "train.log_every=1000", "sample.steps=10", "bridge.t_eps=0.01", "optim.warmup_steps=2"]


def need(loader):
    if loader == "dali":
        ok, why = dali.status()
        skip_unless_available("dali", ok, why)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Source images (non-square, some RGB noise, some smooth) and their prepared folders."""
    root = tmp_path_factory.mktemp("loaders")
    source = root / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        h, w = (20, 24) if i % 2 else (24, 20)
        if i % 3:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            ramp = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5, 0.2])
            pixels = np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(source / f"{i:02d}.png")
    prepare.prepare(source, root / "rgb", R, 3, progress=False)
    prepare.prepare(source, root / "grey", R, 1, progress=False)
    jpeg = root / "jpeg"   # an unprepared folder: JPEG and PNG files of other sizes
    jpeg.mkdir()
    for i in range(12):
        x = np.linspace(0, 1, 48)
        y = np.linspace(0, 1, 40 + 4 * (i % 3))[:, None]
        pixels = np.stack([255 * x * y, 255 * (1 - x) * y, 128 + 100 * np.sin(6 * x + i) * y], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(jpeg / f"{i:02d}.{'jpg' if i % 2 else 'png'}",
                                                      quality=90)
    return {"source": source, "rgb": root / "rgb", "grey": root / "grey", "jpeg": jpeg}


def cfg_for(path, loader, *overrides, channels=3, batch=6, run_dir=None):
    extra = [f"train.run_dir={run_dir}"] if run_dir else []
    return config.load("demo32", TINY + extra + [
        "data.dataset=folder", f"data.path={path}", f"data.resolution={R}", f"data.channels={channels}",
        f"data.loader={loader}", f"train.batch_size={batch}", *overrides])


def stream(path, loader, steps, *overrides, start=0, rank=0, world=1, channels=3, batch=6):
    cfg = cfg_for(path, loader, *overrides, channels=channels, batch=batch)
    ds = data.make_dataset("folder", path=path, resolution=R, channels=channels)
    made = data.make_loader(cfg, ds, device=torch.device("cpu"), start_step=start, rank=rank, world=world)
    assert made.name == loader
    return list(itertools.islice(iter(made), steps))


def assert_same(a, b, atol=0.0):
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, ga, xa), (_, gb, xb) in zip(a, b):
        assert torch.equal(ga, gb)
        assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape
        if atol == 0:
            assert torch.equal(xa, xb), float((xa - xb).abs().max())
        else:
            torch.testing.assert_close(xa, xb, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- same tensors

@pytest.mark.parametrize("loader", ["memory", "dali"])
@pytest.mark.parametrize("folder,channels,dali_atol", [("rgb", 3, 0.0), ("grey", 1, 0.0),
                                                       ("rgb", 1, GREY_LEVEL + 1e-6)])
def test_same_tensors_without_augmentation(folders, loader, folder, channels, dali_atol):
    need(loader)
    path = folders[folder]
    ref = stream(path, "torch", 5, channels=channels)   # 30 samples: epochs 0 and 1
    ds = data.make_dataset("folder", path=path, resolution=R, channels=channels)
    for _, gidx, images in ref:   # the reference itself: the files of the keyed order
        expected = torch.stack([ds[int(i)] for i in data.sample_order(gidx, N, 0)])
        assert torch.equal(images, expected) and images.shape[1:] == (channels, R, R)
    assert_same(stream(path, loader, 5, channels=channels), ref,
                atol=dali_atol if loader == "dali" else 0.0)


@pytest.mark.parametrize("loader", ["memory", "dali"])
def test_same_flips_with_augmentation(folders, loader):
    need(loader)
    plain = stream(folders["rgb"], "torch", 4)
    ref = stream(folders["rgb"], "torch", 4, "data.hflip=true")
    for (_, gidx, x), (_, _, xf) in zip(plain, ref):
        mask = data.flip_mask(gidx, 0)
        assert 0 < int(mask.sum()) < len(mask)
        assert torch.equal(xf[mask], x[mask].flip(-1)) and torch.equal(xf[~mask], x[~mask])
    assert_same(stream(folders["rgb"], loader, 4, "data.hflip=true"), ref)


@pytest.mark.parametrize("loader", ["memory", "dali"])
def test_unprepared_folder(folders, loader):
    need(loader)
    path = folders["jpeg"]
    ref = stream(path, "torch", 3, "data.hflip=true", batch=8)
    got = stream(path, loader, 3, "data.hflip=true", batch=8)
    if loader == "memory":   # decoded once, on threads: exact
        assert_same(got, ref)
        return
    for (_, _, x), (_, _, y) in zip(ref, got):
        gap = (x - y).abs() / GREY_LEVEL   # DALI's decoders and Lanczos resize, not Pillow's
        assert float(gap.mean()) < 1.0 and float(gap.max()) <= 16, (float(gap.mean()), float(gap.max()))


def test_memory_on_the_procedural_set():
    def run(loader):
        cfg = config.load("demo32", TINY + ["data.resolution=8", "data.num_images=20", "data.hflip=true",
                                            f"data.loader={loader}", "train.batch_size=6"])
        ds = data.make_dataset("shapes", resolution=8, channels=3, num_images=20)
        return list(itertools.islice(data.make_loader(cfg, ds, device=torch.device("cpu"), start_step=2), 5))

    assert_same(run("memory"), run("torch"))   # kept as float32: exact


def test_memory_checks_the_prepared_checksum(folders, tmp_path):
    path = tmp_path / "rgb"
    shutil.copytree(folders["rgb"], path)
    Image.fromarray(np.zeros((R, R, 3), dtype=np.uint8)).save(path / "000003.png")
    with pytest.raises(ValueError, match="checksum"):
        stream(path, "memory", 1)


# ----------------------------------------------------------------------------- shards and resume

@pytest.mark.parametrize("loader", LOADERS)
def test_shards_visit_every_file_once(folders, loader):
    need(loader)
    world, steps = 3, -(-N // 6)   # 3 ranks of 2; 4 steps hold global samples 0 … 23
    ranks = [stream(folders["rgb"], loader, steps, "data.hflip=true", rank=r, world=world)
             for r in range(world)]
    whole = stream(folders["rgb"], "torch", steps, "data.hflip=true")
    for s in range(steps):   # each step: the ranks' slices, in rank order, are the whole batch
        assert_same([(s, torch.cat([ranks[r][s][1] for r in range(world)]),
                      torch.cat([ranks[r][s][2] for r in range(world)]))], [whole[s]])
    gidx = torch.cat([g for r in ranks for _, g, _ in r])
    assert torch.equal(gidx.sort().values, torch.arange(steps * 6))   # disjoint, nothing missed
    files = data.sample_order(gidx, N, 0)
    assert torch.equal(files[gidx < N].sort().values, torch.arange(N))   # epoch 0: each file once
    # the last step's overflow is the next epoch's first sample, not a padded repeat
    assert torch.equal(files[gidx >= N], data.epoch_permutation(0, 1, N)[:1])


def test_dali_shards_are_whole_batches(folders, monkeypatch):
    need("dali")
    monkeypatch.setattr(dali, "MIN_WINDOW_STEPS", 1)
    cfg = cfg_for(folders["rgb"], "dali")
    ds = data.make_dataset("folder", path=folders["rgb"], resolution=R, channels=3)
    loaders = [data.make_loader(cfg, ds, device=torch.device("cpu"), start_step=0, rank=r, world=3)
               for r in range(3)]
    for r, made in enumerate(loaders):
        next(iter(made))
        meta = made.reader_meta
        assert (meta["shard_id"], meta["number_of_shards"], meta["pad_last_batch"]) == (r, 3, 1)
        assert meta["epoch_size"] == meta["epoch_size_padded"] == made.window_steps * 6 == 4 * 6
    g, files, labels = loaders[1].window_list(0, 4)   # the reader's list: rank-major
    assert torch.equal(g[1, 2], torch.tensor([14, 15]))
    assert files[8:10] == [ds.files[i] for i in data.sample_order(g[1, 0], N, 0)]
    assert [lab // 2 for lab in labels] == list(range(24))


@pytest.mark.parametrize("loader", LOADERS)
def test_resume_mid_epoch(folders, loader, monkeypatch):
    need(loader)
    monkeypatch.setattr(dali, "MIN_WINDOW_STEPS", 1)   # windows of 4 steps: resume crosses them
    args = (folders["rgb"], loader)
    full = stream(*args, 10, "data.hflip=true", rank=1, world=2)
    resumed = stream(*args, 5, "data.hflip=true", start=5, rank=1, world=2)
    assert_same(resumed, full[5:])
    gidx = torch.cat([g for _, g, _ in full])   # rank 1 of 2: samples 3, 4, 5 of every step
    assert torch.equal(gidx, (torch.arange(10)[:, None] * 6 + torch.arange(3, 6)).reshape(-1))


# ----------------------------------------------------------------------------- training

def test_training_losses_match(folders, tmp_path, monkeypatch, request):
    from agm_fast.trainer import Trainer

    monkeypatch.setattr(Trainer, "write_plot", lambda self: None)   # seconds of matplotlib
    threads = torch.get_num_threads()   # train.threads=1 (fast on a loaded 2-core machine), restored after
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    losses = {}
    for loader in LOADERS:
        if loader == "dali":   # torch vs memory is checked with or without DALI
            assert losses["memory"] == losses["torch"]
            need("dali")
        cfg = cfg_for(folders["rgb"], loader, "train.steps=3", "data.hflip=true", "train.threads=1", batch=4,
                      run_dir=tmp_path / loader)
        trainer = Trainer(cfg, resume=False)
        assert trainer.loader.name == loader
        trainer.run()
        rows = [json.loads(ln) for ln in (tmp_path / loader / "metrics.jsonl").read_text().splitlines()]
        losses[loader] = [(r["loss_f"], r["loss_v"]) for r in rows]
    assert len(losses["torch"]) == 3
    assert losses["memory"] == losses["torch"]   # exactly
    for dali_row, torch_row in zip(losses["dali"], losses["torch"]):   # within decoder tolerance
        assert dali_row == pytest.approx(torch_row, rel=1e-5)


# ----------------------------------------------------------------------------- the choice

def test_auto_choice_is_logged_with_the_reason(folders, caplog, monkeypatch):
    ds = data.make_dataset("folder", path=folders["rgb"], resolution=R, channels=3)
    caplog.set_level(logging.INFO, logger="agm_fast.data")
    made = data.make_loader(cfg_for(folders["rgb"], "auto"), ds, device=torch.device("cpu"), start_step=0)
    assert made.name == "memory"
    assert "data.loader: memory (auto: the set is" in caplog.text and "data.memory_budget_gb=4" in caplog.text
    off = cfg_for(folders["rgb"], "auto", "data.memory_budget_gb=0")
    made = data.make_loader(off, ds, device=torch.device("cpu"), start_step=0)
    assert made.name == "torch" and "over data.memory_budget_gb=0; DALI only on CUDA" in caplog.text
    # on CUDA (only the choice is made here: nothing is allocated)
    cuda = torch.device("cuda")
    monkeypatch.setattr(dali, "status", lambda: (True, "NVIDIA DALI 2.4.0"))
    assert data.choose_loader(off, ds, cuda)[0] == "dali"
    monkeypatch.setattr(dali, "status", lambda: (False, "NVIDIA DALI is not installed"))
    assert data.choose_loader(off, ds, cuda) == ("torch", data.choose_loader(off, ds, cuda)[1])
    assert "no DALI: NVIDIA DALI is not installed" in data.choose_loader(off, ds, cuda)[1]
    name, why = data.choose_loader(cfg_for(folders["rgb"], "memory", "data.memory_budget_gb=0"), ds, cuda)
    assert name == "memory" and "pinned host memory" in why


def test_an_explicit_choice_that_cannot_run_is_an_error(folders, tmp_path, monkeypatch):
    ds = data.make_dataset("folder", path=folders["rgb"], resolution=R, channels=3)
    shapes = data.make_dataset("shapes", resolution=R, channels=3, num_images=8)
    cpu = torch.device("cpu")
    ok, _ = dali.status()
    if ok:
        with pytest.raises(ConfigError, match="data.loader=dali cannot run: .*data.dataset=folder"):
            data.choose_loader(cfg_for(folders["rgb"], "dali"), shapes, cpu)
        gif = tmp_path / "gif"
        shutil.copytree(folders["rgb"], gif)
        Image.fromarray(np.zeros((R, R), dtype=np.uint8)).save(gif / "x.gif")
        with_gif = data.make_dataset("folder", path=gif, resolution=R, channels=3)
        with pytest.raises(ConfigError, match="data.loader=dali cannot run: DALI cannot decode 1 file.*x.gif"):
            data.choose_loader(cfg_for(gif, "dali"), with_gif, cpu)
    monkeypatch.setattr(dali, "status", lambda: (False, "NVIDIA DALI is not installed (pip install --no-build-isolation -e '.[dali]')"))
    with pytest.raises(ConfigError, match=r"data.loader=dali cannot run: NVIDIA DALI is not installed"):
        data.make_loader(cfg_for(folders["rgb"], "dali"), ds, device=cpu, start_step=0)
    monkeypatch.setattr(data, "host_available_bytes", lambda: 1000.0)
    with pytest.raises(ConfigError, match="data.loader=memory cannot run: the set is .* MB but 0 MB of host memory"):
        data.make_loader(cfg_for(folders["rgb"], "memory"), ds, device=cpu, start_step=0)
    with pytest.raises(ConfigError, match="data.loader='fast' is not allowed; choose one of: auto, torch, memory, dali"):
        cfg_for(folders["rgb"], "fast")
    with pytest.raises(ConfigError, match=r"data.memory_budget_gb=-1.0 is out of range \[0, ∞\]"):
        cfg_for(folders["rgb"], "auto", "data.memory_budget_gb=-1")


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("budget", ["4", "0"])   # on the device / in pinned host memory
def test_memory_on_cuda_matches_the_reference(folders, budget):
    cfg = cfg_for(folders["rgb"], "memory", "data.hflip=true", f"data.memory_budget_gb={budget}")
    ds = data.make_dataset("folder", path=folders["rgb"], resolution=R, channels=3)
    made = data.make_loader(cfg, ds, device=torch.device("cuda"), start_step=1)
    assert made.pinned == (budget == "0")
    got = [(s, g, x.cpu()) for s, g, x in itertools.islice(iter(made), 6)]
    assert_same(got, stream(folders["rgb"], "torch", 6, "data.hflip=true", start=1))
