"""channels_last (NHWC) inputs of the fused bridge kernels (docs/design.md §3, issue 10).

Under model.channels_last the drift net's output and the images are NHWC tensors. The kernels
address that layout directly (no NCHW copy) while walking each sample in logical NCHW order, so
the Philox noise of an element is keyed by its logical index: x_t, the loss, per-sample values,
weights and d loss/d pred must equal the NCHW path's bit for bit, in every dtype. The NCHW path's
parity with the PyTorch reference is tests/test_kernels.py; here each NHWC result is compared with
the same kernel on the NCHW copy of the same values, plus one direct check against the reference.
Shapes are tiny (the interpreter is slow) and odd: C = 3 and 1, H ≠ W, batch 1 and 3.
"""

import itertools
import math

import pytest
import torch

from agm_fast import bridge, dispatch
from agm_fast import kernels as K
from conftest import needs_cuda, skip_unless_available

try:
    import triton
except ImportError:
    triton = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = 2**63 + 2**40 + 12345
STEP = 2**31 + 17
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _triton_runs_here():
    skip_unless_available("triton", triton is not None, "triton is not installed")
    if DEVICE.type == "cpu" and not K.interpreter_active():
        pytest.skip("no CUDA and TRITON_INTERPRET was not set before triton was imported")


def inputs(b, c, h, w, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x1 = (torch.rand(b, c, h, w, generator=gen) * 2 - 1).to(dtype)
    pred = torch.randn(b, c, h, w, generator=gen).to(dtype)
    t = torch.rand(b, generator=gen) * 0.99
    v = torch.randn(b, generator=gen) * 3 + 1
    idx = torch.randint(0, 2**32, (b,), generator=gen, dtype=torch.int64)
    return [x.to(DEVICE) for x in (x1, pred, t, v, idx)]


def nhwc(x):
    y = x.contiguous(memory_format=CL)
    assert y.shape[1] == 1 or not y.is_contiguous(), "the NHWC copy must differ from NCHW (C > 1)"
    return y


def is_nhwc(x):
    return x.is_contiguous(memory_format=CL)


def assert_same(name, a, b):
    """Bitwise equality (NaN-free inputs), with the first differing element on failure."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if not torch.equal(a, b):
        diff = (a.double() - b.double()).abs()
        raise AssertionError(f"{name}: {int((diff > 0).sum())} elements differ, max {diff.max().item():.3g}")


def fused_loss(pred, x1, t, v, idx, **kw):
    """(loss, per_sample, weights, grad) of the fused loss, pred a fresh leaf in the given layout.

    autograd.grad, not .backward(): a leaf's .grad is restrided to the leaf's layout on
    accumulation, which would hide the layout the kernel wrote."""
    p = pred.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    loss, per_sample, weights = K.weighted_bridge_loss(p, x1, t, v, seed=SEED, step=STEP, sample_index=idx, **kw)
    (grad,) = torch.autograd.grad(loss, p)
    return loss, per_sample, weights, grad


# ----------------------------------------------------------------------------- bridge sampling

BRIDGE_CASES = [  # b, c, h, w, dtype
    (3, 3, 5, 7, torch.float32),
    (1, 3, 7, 5, torch.bfloat16),
    (3, 3, 4, 6, torch.float16),
    (3, 1, 5, 7, torch.float32),  # C = 1: NHWC is also NCHW-contiguous (the NCHW path runs)
]


@pytest.mark.parametrize("b,c,h,w,dtype", BRIDGE_CASES)
def test_bridge_sample_nhwc_equals_nchw(b, c, h, w, dtype):
    x1, _, t, _, idx = inputs(b, c, h, w, dtype, seed=1)
    kw = dict(seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    want = K.bridge_sample(x1, t, **kw)
    got = K.bridge_sample(nhwc(x1), t, **kw)
    assert is_nhwc(got), f"x_t strides {got.stride()}: not channels_last like x1"
    assert_same("x_t", got, want)


def test_bridge_sample_nhwc_matches_reference_and_dispatch_keeps_the_layout():
    x1, _, t, _, idx = inputs(3, 3, 5, 7, torch.float32, seed=2)
    x0, eps = bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, DEVICE)
    ref = bridge.bridge_sample(x1, t, x0, eps, 0.5)
    kw = dict(seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    torch.testing.assert_close(K.bridge_sample(nhwc(x1), t, **kw), ref, rtol=1e-6, atol=1e-6)
    for impl in ("triton", "torch"):
        out = dispatch.bridge_sample(impl, nhwc(x1), t, **kw)
        assert is_nhwc(out), f"{impl}: x_t strides {out.stride()}"
        assert_same(f"{impl} x_t", out, dispatch.bridge_sample(impl, x1, t, **kw))


# ----------------------------------------------------------------------------- the fused loss

# every choice of predicts, scheme, favour and normalise appears; both dtypes; C = 3 and 1; B = 1 and 3
LOSS_CASES = [
    # b, c, h, w, dtype, predicts, scheme, favour, normalise
    (3, 3, 5, 7, torch.float32, "drift", "softmax", "coherent", "batch"),
    (3, 3, 7, 5, torch.bfloat16, "x1", "softmax", "degenerate", "batch"),
    (1, 3, 5, 7, torch.bfloat16, "drift", "uniform", "coherent", "batch"),
    (3, 3, 5, 7, torch.float32, "drift", "softmax", "degenerate", "t_bins"),
    (3, 1, 5, 7, torch.float32, "x1", "uniform", "degenerate", "batch"),
]


def loss_kw(predicts, scheme, favour, normalise, t):
    kw = dict(sigma=0.5, predicts=predicts, scheme=scheme, favour=favour, tau=0.7, clip=2.0)
    if normalise == "t_bins":
        kw.update(normalise="t_bins", t_bins=2, t_all=t)
    return kw


def check_loss_nhwc(b, c, h, w, dtype, predicts, scheme, favour, normalise, seed=0):
    x1, pred, t, v, idx = inputs(b, c, h, w, dtype, seed=seed)
    kw = loss_kw(predicts, scheme, favour, normalise, t)
    want = fused_loss(pred, x1, t, v, idx, **kw)
    got = fused_loss(nhwc(pred), nhwc(x1), t, v, idx, **kw)
    for name, g, r in zip(("loss", "per_sample", "weights", "d loss/d pred"), got, want):
        assert_same(name, g, r)
    assert is_nhwc(got[3]), f"d loss/d pred strides {got[3].stride()}: not pred's channels_last"
    return x1, pred, t, v, idx, kw, got


@pytest.mark.parametrize("b,c,h,w,dtype,predicts,scheme,favour,normalise", LOSS_CASES)
def test_loss_nhwc_equals_nchw(b, c, h, w, dtype, predicts, scheme, favour, normalise):
    check_loss_nhwc(b, c, h, w, dtype, predicts, scheme, favour, normalise)


def test_loss_nhwc_matches_reference_and_no_grad_path():
    x1, pred, t, v, idx, kw, got = check_loss_nhwc(3, 3, 5, 7, torch.float32, "drift", "softmax", "coherent",
                                                   "batch", seed=3)
    # the reference is elementwise in the logical index: layout-free, bit for bit
    refs = []
    for p_in, x_in in ((pred, x1), (nhwc(pred), nhwc(x1))):
        p = p_in.clone(memory_format=torch.preserve_format).requires_grad_()
        out = bridge.weighted_bridge_loss(p, x_in, t, v, seed=SEED, step=STEP, sample_index=idx, **kw)
        out.loss.backward()
        refs.append((out.loss, out.per_sample, out.weights, p.grad))
    for name, a, r in zip(("loss", "per_sample", "weights", "d loss/d pred"), *refs):
        assert_same(f"reference {name}", a, r)
    for name, g, r in zip(("loss", "per_sample", "weights", "d loss/d pred"), got, refs[0]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        no_grad = K.weighted_bridge_loss(nhwc(pred), nhwc(x1), t, v, seed=SEED, step=STEP, sample_index=idx, **kw)
    for name, a, r in zip(("loss", "per_sample", "weights"), no_grad, got):
        assert_same(f"no-grad {name}", a, r)


def test_loss_mixed_and_other_layouts():
    """The layout follows pred (its gradient keeps it); x1 is brought into it; anything else is copied."""
    x1, pred, t, v, idx = inputs(3, 3, 5, 7, torch.bfloat16, seed=4)
    kw = loss_kw("drift", "softmax", "coherent", "batch", t)
    want = fused_loss(pred, x1, t, v, idx, **kw)
    strided = torch.stack([pred, pred], dim=-1)[..., 0]  # the same values, neither NCHW nor NHWC dense
    assert not strided.is_contiguous() and not is_nhwc(strided)
    for p_in, x_in, grad_nhwc in ((nhwc(pred), x1, True), (pred, nhwc(x1), False), (strided, nhwc(x1), False)):
        got = fused_loss(p_in, x_in, t, v, idx, **kw)
        for name, g, r in zip(("loss", "per_sample", "weights", "d loss/d pred"), got, want):
            assert_same(name, g, r)
        assert is_nhwc(got[3]) == grad_nhwc and (grad_nhwc or got[3].is_contiguous())


# ----------------------------------------------------------------------------- the GPU launch layout

@pytest.mark.parametrize("block,programs", [(16, None), (16, 2)])
def test_nhwc_under_the_cuda_launch_layout(monkeypatch, block, programs):
    """Many programs per sample, as on CUDA (tests/test_kernels.py's test_many_programs_per_sample):
    16-element blocks over 3×5×7 samples cross channel boundaries (H·W = 35) mid-block."""
    from agm_fast.kernels import utils
    monkeypatch.setattr(utils, "launch_config",
                        lambda device, n, interpreted: (block, programs or triton.cdiv(n, block)))
    check_loss_nhwc(3, 3, 5, 7, torch.float32, "drift", "softmax", "coherent", "batch", seed=5)
    check_loss_nhwc(1, 3, 7, 5, torch.bfloat16, "x1", "softmax", "degenerate", "batch", seed=6)
    x1, _, t, _, idx = inputs(3, 3, 5, 7, torch.bfloat16, seed=7)
    kw = dict(seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    assert_same("x_t", K.bridge_sample(nhwc(x1), t, **kw), K.bridge_sample(x1, t, **kw))
    ref = bridge.bridge_sample(x1.float(), t, *bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, DEVICE), 0.5)
    torch.testing.assert_close(K.bridge_sample(nhwc(x1.float()), t, **kw), ref, rtol=1e-6, atol=1e-6)


@needs_cuda
def test_cuda_nhwc_equals_nchw_at_training_shapes():
    """Native launch layout: 1,024-element blocks over 64² images, and an odd 33×47 one whose
    channel boundaries fall mid-block."""
    for b, c, h, w in ((64, 3, 64, 64), (5, 3, 33, 47)):
        for dtype in (torch.bfloat16, torch.float32):
            check_loss_nhwc(b, c, h, w, dtype, "drift", "softmax", "coherent", "batch", seed=8)
            x1, _, t, _, idx = inputs(b, c, h, w, dtype, seed=9)
            kw = dict(seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
            assert_same("x_t", K.bridge_sample(nhwc(x1), t, **kw), K.bridge_sample(x1, t, **kw))
