"""agm_fast.sampler: EM steps (torch vs fused op), the grid, the sampler, checkpoints, image files."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from agm_fast import checkpoint, ext, images, rng, sampler
from tests.conftest import needs_cuda, skip_unless_available


def _need_ext(device="cpu"):
    ok, why = ext.available(device)
    skip_unless_available("ext", ok, why)


class TinyDrift(nn.Module):
    """Stand-in drift net (per-sample, no batch coupling): channel mixing + a spatial shift.

    No conv2d: on this CPU torch a batch-1 conv2d takes ~25 ms, which would dominate the tests.
    """

    def __init__(self, in_channels=3, resolution=8, width=4):
        super().__init__()
        self.mix_in = nn.Linear(in_channels, width)
        self.mix_out = nn.Linear(width, in_channels)
        self.resolution = resolution

    def forward(self, x, t):
        h = self.mix_in(torch.roll(x, 1, dims=-1).movedim(1, -1))
        h = torch.tanh(h + t[:, None, None, None])
        return self.mix_out(h).movedim(-1, 1) - 0.5 * x


def _tiny(c=3, res=8, seed=0):
    torch.manual_seed(seed)
    return TinyDrift(c, res)


# ----------------------------------------------------------------------------- one step

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("last", [False, True])
def test_em_step_ext_equals_torch(dtype, last):
    _need_ext()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 5, 7, generator=g).to(dtype)
    drift = torch.randn(3, 3, 5, 7, generator=g).to(dtype)
    kw = dict(dt=0.01, sigma=0.7, seed=99, step=12, image_index=torch.tensor([4, 0, 9]), last=last)
    a = sampler.em_step(x.clone(), drift, impl="torch", **kw)
    b = sampler.em_step(x.clone(), drift, impl="ext", **kw)
    if last or dtype == torch.float32:
        torch.testing.assert_close(b, a, rtol=1e-6, atol=2e-6 * 0.07)  # noise enters scaled by σ·sqrt(dt)
    else:  # bf16 storage: a last-ulp difference in z may flip one rounding of the bf16 result
        assert ((b.float() - a.float()).abs() <= 2 ** -7 * a.float().abs().clamp(min=1e-2)).all()
    if last:
        assert torch.equal(a, (x.float() + drift.float() * 0.01).to(dtype))


def test_em_step_rejects_unknown_impl():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="sample.em"):
        sampler.em_step(x, x, dt=0.1, sigma=0.1, seed=0, step=0, image_index=0, impl="cuda")


# ----------------------------------------------------------------------------- the grid

def test_time_grid_is_k_over_n():
    t = sampler.time_grid(200, 0.0, 1e-3)
    assert t.dtype == torch.float32 and t.shape == (200,)
    assert torch.equal(t, torch.tensor([k / 200 for k in range(200)], dtype=torch.float32))
    assert float(t[-1]) <= 1 - 1e-3
    sampler.time_grid(1000, 0.0, 1e-3)  # t_eps = 1/N exactly is inside


@pytest.mark.parametrize("steps,t_min,t_eps,match", [(0, 0.0, 1e-3, "steps"), (2.5, 0.0, 1e-3, "steps"),
                                                     (1001, 0.0, 1e-3, "outside the trained range"),
                                                     (10, 0.05, 1e-3, "t_min")])
def test_time_grid_rejects_grids_outside_training(steps, t_min, t_eps, match):
    with pytest.raises(ValueError, match=match):
        sampler.time_grid(steps, t_min, t_eps)


# ----------------------------------------------------------------------------- the sampler

def test_sampler_ext_equals_torch_reference_loop():
    _need_ext()
    net = _tiny()
    kw = dict(n=5, shape=(3, 8, 8), steps=20, sigma=0.5, seed=3, batch_size=4, progress=False)
    a = sampler.sample(net, em="torch", **kw)
    b = sampler.sample(net, em="ext", **kw)
    assert a.shape == (5, 3, 8, 8) and a.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_sampler_deterministic_and_independent_of_batch_size():
    net = _tiny()
    kw = dict(n=7, shape=(3, 8, 8), steps=10, sigma=0.5, seed=11, progress=False)
    a = sampler.sample(net, batch_size=7, **kw)
    b = sampler.sample(net, batch_size=3, **kw)
    c = sampler.sample(net, batch_size=1, **kw)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
    # image i is keyed by first_index + i: a later slice is the same images
    d = sampler.sample(net, batch_size=2, **{**kw, "n": 3}, first_index=4)
    torch.testing.assert_close(d, a[4:], rtol=1e-6, atol=1e-6)
    e = sampler.sample(net, batch_size=7, **{**kw, "seed": 12})
    assert (e - a).abs().max() > 0.1


def test_compiled_drift_gives_the_eager_images():
    """sample(compile=True) (the trainer's sample.compile): torch.compile'd drift under inference
    mode, same images. One batch shape, so one compilation (≈ 10 s on CPU)."""
    net = _tiny()
    kw = dict(n=2, shape=(3, 8, 8), steps=3, sigma=0.5, seed=2, batch_size=2, progress=False)
    torch.testing.assert_close(sampler.sample(net, compile=True, **kw), sampler.sample(net, **kw),
                               rtol=1e-5, atol=1e-5)


def test_one_step_sampler_adds_no_noise():
    """steps=1 is only the last step: x0 + f(x0, 0)·1, no EM noise at all."""
    net = _tiny(c=1)
    out = sampler.sample(net, n=3, shape=(1, 8, 8), steps=1, sigma=0.9, t_eps=1e-3, seed=5, progress=False)
    x0 = rng.normal(5, 0, torch.arange(3), 64, rng.Stream.SAMPLE_X0).reshape(3, 1, 8, 8)
    with torch.no_grad():
        want = x0 + net(x0, torch.zeros(3))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_last_step_of_a_run_adds_no_noise(monkeypatch):
    calls = []
    real = sampler._em_step_resolved

    def spy(impl, x, drift, **kw):
        calls.append(kw["last"])
        return real(impl, x, drift, **kw)

    monkeypatch.setattr(sampler, "_em_step_resolved", spy)
    sampler.sample(_tiny(), n=2, shape=(3, 8, 8), steps=6, sigma=0.5, progress=False)
    assert calls == [False] * 5 + [True]


# 2-D Gaussian toy: x1 ~ N(μ, Σ), x0 ~ N(0, I); x_t = (1−t)x0 + t·x1 + σ·sqrt(t(1−t))·ε is Gaussian with
# C_t = (1−t)²I + t²Σ + σ²t(1−t)I and E[x1 | x_t = x] = μ + tΣC_t⁻¹(x − tμ); the drift (E[x1|x] − x)/(1−t)
# transports N(0, I) to N(μ, Σ) (Markovian projection of the bridge, docs/design.md §1).
MU = np.array([0.5, -0.3])
SIGMA_DATA = np.array([[0.6, 0.25], [0.25, 0.4]])


def _toy_affine(t: float, sigma: float):
    """drift(x, t) = A x + b (fp64)."""
    c_t = (1 - t) ** 2 * np.eye(2) + t * t * SIGMA_DATA + sigma ** 2 * t * (1 - t) * np.eye(2)
    gain = t * SIGMA_DATA @ np.linalg.inv(c_t)
    return (gain - np.eye(2)) / (1 - t), (MU - gain @ (t * MU)) / (1 - t)


def _toy_drift(sigma, predicts="drift"):
    def drift(x, t):
        a, b = _toy_affine(float(t[0]), sigma)
        v = x.reshape(-1, 2).double()
        d = v @ torch.from_numpy(a).T + torch.from_numpy(b)
        if predicts == "x1":  # x̂1 = x + (1 − t)·drift
            d = v + (1 - float(t[0])) * d
        return d.float().reshape(x.shape)
    return drift


def _toy_exact_moments(steps, sigma):
    """Mean and covariance after the discrete EM scheme (exact: every step is affine-Gaussian)."""
    m, p, dt = np.zeros(2), np.eye(2), 1.0 / steps
    for k in range(steps):
        a, b = _toy_affine(np.float32(k) / np.float32(steps), sigma)
        step_map = np.eye(2) + dt * a
        m, p = step_map @ m + dt * b, step_map @ p @ step_map.T
        if k < steps - 1:
            p = p + sigma ** 2 * dt * np.eye(2)
    return m, p


@pytest.mark.parametrize("sigma,predicts", [(0.5, "drift"), (0.0, "drift"), (0.5, "x1")])
def test_gaussian_toy_reaches_target_mean_and_covariance(sigma, predicts):
    n, steps = 4096, 100
    out = sampler.sample(_toy_drift(sigma, predicts), n=n, shape=(2, 1, 1), steps=steps, sigma=sigma,
                         predicts=predicts, t_eps=1 / steps, seed=1, batch_size=n, progress=False)
    x = out.reshape(n, 2).double().numpy()
    mean, cov = x.mean(0), np.cov(x.T)
    m_exact, p_exact = _toy_exact_moments(steps, sigma)
    # (1) the discrete scheme's own bias is small: the noiseless last step lands on E[x1 | x_t] at
    # t = 1 − 1/N, whose covariance falls short of Σ by Var(x1 | x_t) = O(σ²/N) plus O(1/N) EM error
    assert np.abs(m_exact - MU).max() < 1e-6
    assert np.abs(p_exact - SIGMA_DATA).max() < 0.02
    # (2) the samples match the scheme's exact moments within 5 standard errors of n samples:
    # se(mean_i) = sqrt(P_ii/n), se(cov_ij) = sqrt((P_ii P_jj + P_ij²)/n)
    se_mean = np.sqrt(np.diag(p_exact) / n)
    se_cov = np.sqrt((np.outer(np.diag(p_exact), np.diag(p_exact)) + p_exact ** 2) / n)
    assert (np.abs(mean - m_exact) < 5 * se_mean).all(), (mean, m_exact)
    assert (np.abs(cov - p_exact) < 5 * se_cov).all(), (cov, p_exact)


def test_sample_bad_arguments():
    net = _tiny()
    kw = dict(n=2, shape=(3, 8, 8), steps=4, sigma=0.5, progress=False)
    for bad, match in [(dict(n=0), "n "), (dict(shape=(3, 8)), "shape"), (dict(sigma=-1.0), "sigma"),
                       (dict(predicts="eps"), "predicts"), (dict(batch_size=0), "batch_size"),
                       (dict(em="fast"), "sample.em"), (dict(steps=0), "steps"), (dict(t_eps=0.5), "trained"),
                       (dict(seed=-1), "seed")]:
        with pytest.raises(ValueError, match=match):
            sampler.sample(net, **{**kw, **bad})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph"):
            sampler.sample(net, **kw, cuda_graph=True)
    with pytest.raises(ValueError, match="x's shape"):
        sampler.sample(lambda x, t: x[:, :1], **kw)


# ----------------------------------------------------------------------------- checkpoints

ARCH = dict(in_channels=3, resolution=8)


@pytest.fixture
def stand_in_net(monkeypatch):
    monkeypatch.setattr(checkpoint, "build_drift_net", lambda arch: TinyDrift(**arch))


def _save(path, net, *, sigma=0.5, t_min=0.0, t_eps=1e-3, arch=ARCH, config=None, predicts="drift"):
    checkpoint.save_drift(path, net.state_dict(), arch, predicts=predicts, sigma=sigma, t_min=t_min, t_eps=t_eps,
                       config=config or {"sample": {"steps": 8}}, step=123)


def test_checkpoint_round_trip(tmp_path, stand_in_net):
    net = _tiny()
    path = tmp_path / "ema.safetensors"
    _save(path, net)
    loaded, meta = checkpoint.load_drift(path)
    assert meta == {"format": checkpoint.DRIFT_FORMAT, "drift_arch": ARCH, "predicts": "drift", "sigma": 0.5, "t_min": 0.0,
                    "t_eps": 1e-3, "config": {"sample": {"steps": 8}}, "step": 123}
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not loaded.training
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temp file
    imgs = sampler.sample_from_checkpoint(path, n=3, seed=2, progress=False, out_png=tmp_path / "g.png",
                                          out_npz=tmp_path / "s.npz", nrow=2)
    want = sampler.sample(net, n=3, shape=(3, 8, 8), steps=8, sigma=0.5, seed=2, progress=False)
    torch.testing.assert_close(imgs, want)  # steps defaulted to the config's sample.steps
    from PIL import Image
    png = Image.open(tmp_path / "g.png")
    assert png.mode == "RGB" and png.size == (2 * 10 + 2, 2 * 10 + 2)
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(arr, images.to_uint8(imgs))


def test_checkpoint_with_the_real_drift_unet(tmp_path):
    models = pytest.importorskip("agm_fast.models")
    arch = dict(in_channels=1, resolution=8, channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                num_heads=1, dropout=0.0, attention="auto", time_injection="add", fused_norm="off")
    net = models.DriftUNet(**arch)
    path = tmp_path / "ema.safetensors"
    _save(path, net, arch=arch)
    loaded, _ = checkpoint.load_drift(path)
    imgs = sampler.sample_from_checkpoint(path, n=2, steps=3, progress=False)
    assert imgs.shape == (2, 1, 8, 8) and torch.isfinite(imgs).all()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), net.eval()(x, t))


def test_checkpoint_errors(tmp_path, stand_in_net):
    from safetensors.torch import save_file
    net = _tiny()
    good = tmp_path / "ema.safetensors"
    _save(good, net)
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint.load_drift(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError, match="not an agm_fast drift checkpoint"):
        checkpoint.load_drift(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an agm_fast drift checkpoint"):
        checkpoint.load_drift(foreign)
    empty = tmp_path / "empty.safetensors"
    meta = {"format": checkpoint.DRIFT_FORMAT, "drift_arch": json.dumps(ARCH), "predicts": "drift", "sigma": "0.5",
            "t_min": "0.0", "t_eps": "0.001", "config": "{}", "step": "1"}
    save_file({}, str(empty), metadata=meta)
    with pytest.raises(ValueError, match="no EMA drift weights"):
        checkpoint.load_drift(empty)
    wrong_arch = tmp_path / "wrong.safetensors"
    _save(wrong_arch, net, arch=dict(in_channels=1, resolution=8))
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint.load_drift(wrong_arch)
    for kw, match in [(dict(shape=(1, 8, 8)), "image shape"), (dict(shape=(3, 16, 16)), "image shape"),
                      (dict(steps=0), "steps"), (dict(sigma=0.25), "differs from the checkpoint"),
                      (dict(steps=2000), "outside the trained range")]:
        with pytest.raises(ValueError, match=match):
            sampler.sample_from_checkpoint(good, n=1, progress=False, **kw)
    late = tmp_path / "late.safetensors"
    _save(late, net, t_min=0.1)
    with pytest.raises(ValueError, match="t_min"):
        sampler.sample_from_checkpoint(late, n=1, progress=False)
    assert sampler.sample_from_checkpoint(good, n=1, sigma=0.5, steps=2, progress=False).shape == (1, 3, 8, 8)


def test_sample_from_a_run_or_checkpoint_directory(tmp_path, stand_in_net):
    # what the README shows: sample_from_checkpoint("runs/demo", ...), as the CLI accepts it
    net = _tiny()
    for step in (1, 2):
        ckpt = tmp_path / "run" / "checkpoints" / f"ckpt-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text("{}")
        _save(ckpt / "ema.safetensors", _tiny(seed=step) if step == 1 else net)
    want = sampler.sample_from_checkpoint(ckpt / "ema.safetensors", n=2, progress=False)
    for path in (tmp_path / "run", ckpt, str(ckpt)):
        torch.testing.assert_close(sampler.sample_from_checkpoint(path, n=2, progress=False), want)
    with pytest.raises(FileNotFoundError, match="no such file"):
        sampler.sample_from_checkpoint(tmp_path, n=1, progress=False)


def test_bad_nrow_is_refused_before_sampling(tmp_path, stand_in_net, monkeypatch):
    path = tmp_path / "ema.safetensors"
    _save(path, _tiny())
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: pytest.fail("sampled before checking nrow"))
    with pytest.raises(ValueError, match="nrow"):
        sampler.sample_from_checkpoint(path, n=4, out_png=tmp_path / "g.png", nrow=0, progress=False)


def test_static_buffer_step_equals_eager_loop_on_cpu():
    """The step a CUDA graph captures, run eagerly on the CPU on its static buffers: same images as
    the eager loop, including a short last batch (padded with copies) and the noiseless last step."""
    _need_ext()
    net = _tiny()
    steps, sigma, seed = 9, 0.5, 21
    want = sampler.sample(net, n=5, shape=(3, 8, 8), steps=steps, sigma=sigma, seed=seed, em="ext",
                          batch_size=3, progress=False)
    g = sampler._StepGraph(net, (3, 3, 8, 8), steps, 1.0 / steps, sigma, seed, "drift", False, torch.device("cpu"))
    assert g.graph is None  # nothing captured off CUDA
    got = []
    with torch.inference_mode():
        for start, b in ((0, 3), (3, 2)):  # the second batch is short: 2 of 3 rows
            idx = torch.arange(start, start + b)
            x0 = rng.normal(seed, 0, idx, 3 * 8 * 8, rng.Stream.SAMPLE_X0).reshape(b, 3, 8, 8)
            got.append(g.run(x0, idx))
            assert int(g.step) == steps - 1  # advanced in the buffer once per replayed step
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_sampler_equals_eager(bf16):
    _need_ext("cuda")
    net = _tiny().cuda()
    kw = dict(n=6, shape=(3, 8, 8), steps=12, sigma=0.5, seed=4, batch_size=4, device="cuda", bf16=bf16,
              progress=False)
    eager = sampler.sample(net, em="ext", **kw)
    graph = sampler.sample(net, em="ext", cuda_graph=True, **kw)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    ref = sampler.sample(net, em="torch", **kw)
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_graph_replays_draw_new_noise():
    """With a zero drift, each replay adds σ·sqrt(dt)·z_k: consecutive increments must differ."""
    _need_ext("cuda")
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    g = sampler._StepGraph(zero, (2, 1, 4, 4), 10, 0.1, 1.0, 7, "drift", False, torch.device("cuda"))
    with torch.inference_mode():
        g.x.zero_()
        g.idx.copy_(torch.arange(2))
        g.step.zero_()
        g.graph.replay()
        first = g.x.clone()
        g.graph.replay()
        second = g.x - first
    assert int(g.step) == 2
    z0 = rng.normal(7, 0, torch.arange(2), 16, rng.Stream.EM).reshape(2, 1, 4, 4) * math.sqrt(0.1)
    z1 = rng.normal(7, 1, torch.arange(2), 16, rng.Stream.EM).reshape(2, 1, 4, 4) * math.sqrt(0.1)
    torch.testing.assert_close(first.cpu(), z0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.cpu(), z1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


def test_missing_extension_auto_falls_back_and_ext_is_a_clear_error(monkeypatch):
    from agm_fast import dispatch
    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "_IMPORT_ERROR", "agm_fast._C is not built (simulated)")
    assert ext.available("cpu") == (False, "agm_fast._C is not built (simulated)")
    assert dispatch.resolve("sample.em", "auto", torch.device("cpu"))[0] == "torch"
    out = sampler.sample(_tiny(), n=2, shape=(3, 8, 8), steps=3, sigma=0.5, em="auto", progress=False)
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="not built"):
        sampler.sample(_tiny(), n=2, shape=(3, 8, 8), steps=3, sigma=0.5, em="ext", progress=False)
    with pytest.raises(RuntimeError, match="not built"):
        ext.em_step_last_(torch.zeros(1, 2), torch.zeros(1, 2), dt=0.1)
