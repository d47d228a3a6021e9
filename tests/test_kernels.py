"""Parity of the fused Triton kernels (agm_fast.kernels) with the PyTorch reference (agm_fast.bridge).

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1) on a
covering subset of the shape matrix; with CUDA the same checks run natively, plus the full
matrix. Parity rule (docs/design.md §3): the kernel's max error against an fp64 reference is at most
2× the same-dtype PyTorch reference's error plus a floor relative to the values' magnitude:
1e-6 for elementwise outputs, 1e-5 for reductions.
"""

import importlib
import itertools
import math
import os

import pytest
import torch

from agm_fast import bridge, rng
from agm_fast import kernels as K
from conftest import needs_cuda, skip_unless_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T_EPS = 1e-3
SEED = 2**63 + 2**40 + 12345  # both key words non-trivial, high bit set
STEP = 2**31 + 17             # a step word ≥ 2³¹ (uint32 handling)
ELEMENTWISE_FLOOR = 1e-6
REDUCTION_FLOOR = 1e-5
# the loss hyperparameters where a test does not vary them (the config's defaults, passed explicitly)
LOSS_CHOICES = dict(predicts="drift", scheme="softmax", favour="coherent", tau=1.0, clip=2.0)
LOSS_KW = dict(sigma=0.5, **LOSS_CHOICES)


@pytest.fixture(autouse=True)
def _triton_runs_here():
    skip_unless_available("triton", triton is not None, "triton is not installed")
    if DEVICE.type == "cpu" and not K.interpreter_active():
        pytest.skip("no CUDA and TRITON_INTERPRET was not set before triton was imported")


# ----------------------------------------------------------------------------- test-only kernels

if triton is not None:
    from agm_fast.kernels import philox, utils

    @triton.jit
    def _philox_words_kernel(words_ptr, uniforms_ptr, sample_index_ptr, n_draws, seed_lo, seed_hi,
                             step, STREAM: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        k0, k1, step_u32, sample = philox.key_words(seed_lo, seed_hi, step, sample_index_ptr, b)
        q = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = philox.philox_words(q.to(tl.uint32), sample, step_u32, STREAM, k0, k1)
        base = (b * 4 * n_draws + 4 * q).to(tl.int64)
        mask = q < n_draws
        for lane, r in ((0, r0), (1, r1), (2, r2), (3, r3)):
            tl.store(words_ptr + base + lane, r.to(tl.int32, bitcast=True), mask=mask)
            tl.store(uniforms_ptr + base + lane, philox.uniform(r), mask=mask)

    @triton.jit
    def _normals_kernel(out_ptr, sample_index_ptr, n, seed_lo, seed_hi, step,
                        STREAM: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        k0, k1, step_u32, sample = philox.key_words(seed_lo, seed_hi, step, sample_index_ptr, b)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = philox.normal_block(start // 4, sample, step_u32, STREAM, k0, k1, BLOCK)
            tl.store(out_ptr + b * n + offs, z, mask=offs < n)


# ----------------------------------------------------------------------------- helpers

def kernel_loss(*args, **kw) -> bridge.LossOutput:
    """The fused loss with the reference's result type (the kernel wrapper returns a plain tuple)."""
    return bridge.LossOutput(*K.weighted_bridge_loss(*args, **kw))


def assert_parity(name, fast, ref, ref64, floor):
    """max|fast - ref64| ≤ 2·max|ref - ref64| + floor·max|ref64| (+ 1e-30 for all-zero outputs)."""
    fast64, ref_err = fast.detach().double(), (ref.detach().double() - ref64).abs().max().item()
    err = (fast64 - ref64).abs().max().item()
    bound = 2 * ref_err + floor * ref64.abs().max().item() + 1e-30
    assert err <= bound, f"{name}: kernel error {err:.3g} > {bound:.3g} (reference error {ref_err:.3g})"


def make_t(kind, b, gen):
    if kind == "near0":  # includes t = 0 exactly
        t = torch.rand(b, generator=gen) * 1e-3
        t[0] = 0.0
    elif kind == "near1":  # the top of U[t_min, 1 - t_eps], where σ·sqrt(t/(1-t)) is largest
        t = 1 - T_EPS - torch.rand(b, generator=gen) * 1e-4
        t[0] = 1 - T_EPS
    else:
        t = torch.rand(b, generator=gen) * (1 - T_EPS)
    return t.to(torch.float32)


def make_inputs(b, c, h, dtype, t_kind, n_v=None, seed=0, w=None):
    gen = torch.Generator().manual_seed(seed)
    w = h if w is None else w
    x1 = (torch.rand(b, c, h, w, generator=gen) * 2 - 1).to(dtype)
    pred = torch.randn(b, c, h, w, generator=gen).to(dtype)
    t = make_t(t_kind, b, gen)
    v = torch.randn(b if n_v is None else n_v, generator=gen) * 3 + 1
    idx = torch.randint(0, 2**32, (b,), generator=gen, dtype=torch.int64)
    return [x.to(DEVICE) for x in (x1, pred, t, v, idx)]


def run_both(pred, x1, t, v, idx, **kw):
    """Kernel and reference loss on the same inputs; returns (kernel, reference, fp64 reference)."""
    out = []
    for fn, cast in ((kernel_loss, None), (bridge.weighted_bridge_loss, None),
                     (bridge.weighted_bridge_loss, torch.float64)):
        p = pred.detach().to(cast or pred.dtype).requires_grad_()
        x, tt = (x1, t) if cast is None else (x1.to(cast), t.to(cast))
        res = fn(p, x, tt, v, seed=SEED, step=STEP, sample_index=idx, **kw)
        res.loss.backward()
        out.append((res, p.grad))
    return out


def check_loss_case(b, c, h, dtype, predicts, scheme, favour, clip, t_kind, sigma=0.5, seed=0):
    x1, pred, t, v, idx = make_inputs(b, c, h, dtype, t_kind, seed=seed)
    kw = dict(sigma=sigma, predicts=predicts, scheme=scheme, favour=favour, tau=0.7, clip=clip)
    (fast, g_fast), (ref, g_ref), (ref64, g_64) = run_both(pred, x1, t, v, idx, **kw)
    assert fast.loss.dtype == torch.float32 and fast.loss.shape == ()
    assert fast.per_sample.shape == (b,) and fast.weights.shape == (b,)
    assert g_fast.dtype == pred.dtype and g_fast.shape == pred.shape
    assert_parity("loss", fast.loss, ref.loss, ref64.loss, REDUCTION_FLOOR)
    assert_parity("per_sample", fast.per_sample, ref.per_sample, ref64.per_sample, REDUCTION_FLOOR)
    torch.testing.assert_close(fast.weights, ref.weights, rtol=REDUCTION_FLOOR, atol=1e-6)
    assert_parity("d loss/d pred", g_fast, g_ref, g_64, ELEMENTWISE_FLOOR)
    assert not fast.per_sample.requires_grad and not fast.weights.requires_grad


# ----------------------------------------------------------------------------- noise

def test_philox_words_and_uniforms_bit_identical():
    idx = torch.tensor([0, 1, 7, 2**31, 2**32 - 1], dtype=torch.int64, device=DEVICE)
    n_draws = 37
    for seed, step, stream in ((0, 0, rng.Stream.X0), (SEED, STEP, rng.Stream.EPS),
                               (2**64 - 1, 2**32 - 1, rng.Stream.EM)):
        words = torch.empty(5, n_draws * 4, dtype=torch.int32, device=DEVICE)
        uniforms = torch.empty(5, n_draws * 4, dtype=torch.float32, device=DEVICE)
        _philox_words_kernel[(5,)](words, uniforms, idx, n_draws, *rng.split_seed(seed), step,
                                   STREAM=int(stream), BLOCK=64)
        draws = torch.arange(n_draws, device=DEVICE)
        ref = rng.philox4x32(draws[None, :], idx[:, None], step, int(stream), *rng.split_seed(seed))
        ref = torch.stack(ref, dim=-1).reshape(5, -1)
        assert torch.equal(words.to(torch.int64) & rng.MASK32, ref)
        assert torch.equal(uniforms, rng.uint_to_uniform(ref))


@pytest.mark.parametrize("numel", [1, 3, 147, 3000])
@pytest.mark.parametrize("stream", [rng.Stream.X0, rng.Stream.EPS])
def test_in_kernel_normals_match_rng(numel, stream):
    idx = torch.tensor([5, 0, 2**32 - 1], dtype=torch.int64, device=DEVICE)
    out = torch.empty(3, numel, dtype=torch.float32, device=DEVICE)
    _normals_kernel[(3,)](out, idx, numel, *rng.split_seed(SEED), STEP, STREAM=int(stream), BLOCK=256)
    ref = rng.normal(SEED, STEP, idx, numel, stream, DEVICE)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_noise_only_kernel_sums_the_loss_noise():
    idx = torch.tensor([3, 11], dtype=torch.int64, device=DEVICE)
    n = 3 * 17 * 19
    got = K.noise_sum(SEED, STEP, idx, n)
    x0, eps = bridge.draw_bridge_noise(SEED, STEP, idx, (2, n), DEVICE)
    torch.testing.assert_close(got, (x0 + eps).sum(dim=1), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- bridge sampling

@pytest.mark.parametrize("b,c,h,w,dtype,t_kind,sigma", [
    (1, 1, 7, 7, torch.float32, "near0", 0.5),
    (3, 3, 28, 28, torch.bfloat16, "near1", 0.5),
    (64, 1, 32, 32, torch.float32, "mixed", 1.0),
    (3, 3, 64, 64, torch.float32, "near1", 0.0),
    (3, 3, 5, 9, torch.float16, "mixed", 0.5),
])
def test_bridge_sample_matches_reference(b, c, h, w, dtype, t_kind, sigma):
    x1, _, t, _, idx = make_inputs(b, c, h, dtype, t_kind, seed=1, w=w)
    xt = K.bridge_sample(x1, t, seed=SEED, step=STEP, sample_index=idx, sigma=sigma)
    assert xt.dtype == dtype and xt.shape == x1.shape
    x0, eps = bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, DEVICE)
    ref = bridge.bridge_sample(x1, t, x0, eps, sigma).to(dtype)
    ref64 = bridge.bridge_sample(x1.double(), t.double(), x0.double(), eps.double(), sigma)
    assert_parity("x_t", xt, ref, ref64, ELEMENTWISE_FLOOR)


def test_bridge_sample_at_t0_is_x0_and_non_contiguous_x1():
    x1, _, _, _, idx = make_inputs(3, 3, 8, torch.float32, "mixed", seed=2)
    x1_nc = x1.transpose(2, 3)  # a non-contiguous view
    t = torch.zeros(3, device=DEVICE)
    xt = K.bridge_sample(x1_nc, t, seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    x0, _ = bridge.draw_bridge_noise(SEED, STEP, idx, x1_nc.shape, DEVICE)
    torch.testing.assert_close(xt, x0, rtol=1e-6, atol=1e-6)
    t = torch.full((3,), 0.3, device=DEVICE)
    xt = K.bridge_sample(x1_nc, t, seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    ref = bridge.bridge_sample(x1_nc, t, *bridge.draw_bridge_noise(SEED, STEP, idx, x1_nc.shape, DEVICE), 0.5)
    torch.testing.assert_close(xt, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the fused loss

# A covering subset of B × C × H × dtype × predicts × scheme × favour × clip × t: every value of
# each factor appears, most pairs of the important ones (dtype × t, scheme × favour) too.
LOSS_CASES = [
    # b, c, h, dtype, predicts, scheme, favour, clip, t_kind
    (1, 1, 7, torch.float32, "drift", "softmax", "coherent", 2.0, "near0"),
    (1, 3, 64, torch.bfloat16, "drift", "softmax", "degenerate", math.inf, "near1"),
    (3, 1, 28, torch.float32, "drift", "softmax", "degenerate", 2.0, "near1"),
    (3, 3, 32, torch.bfloat16, "x1", "softmax", "coherent", math.inf, "mixed"),
    (3, 3, 7, torch.float32, "drift", "uniform", "coherent", 2.0, "mixed"),
    (3, 1, 64, torch.float32, "drift", "softmax", "degenerate", 0.5, "near1"),
    (1, 1, 32, torch.bfloat16, "x1", "softmax", "degenerate", 2.0, "near0"),
    (64, 1, 28, torch.bfloat16, "drift", "softmax", "coherent", 2.0, "mixed"),
    (64, 3, 32, torch.float32, "drift", "softmax", "coherent", math.inf, "near0"),
    (64, 1, 7, torch.float32, "x1", "uniform", "degenerate", 2.0, "near1"),
    (64, 3, 64, torch.bfloat16, "drift", "softmax", "degenerate", 2.0, "near1"),
]


@pytest.mark.parametrize("b,c,h,dtype,predicts,scheme,favour,clip,t_kind", LOSS_CASES)
def test_loss_matches_reference(b, c, h, dtype, predicts, scheme, favour, clip, t_kind):
    check_loss_case(b, c, h, dtype, predicts, scheme, favour, clip, t_kind)


def test_loss_rectified_flow_and_fp16():
    check_loss_case(3, 3, 28, torch.float16, "drift", "softmax", "coherent", 2.0, "mixed", sigma=0.0)


def test_chunks_add_up_to_the_batch_loss():
    """Micro-batches with v_offset and normalizer = batch size sum to the whole batch's loss."""
    x1, pred, t, v, idx = make_inputs(9, 3, 7, torch.float32, "mixed", seed=3)
    kw = dict(seed=SEED, step=STEP, sigma=0.5, predicts="drift", scheme="softmax", favour="coherent",
              tau=0.5, clip=1.5)
    full = kernel_loss(pred, x1, t, v, sample_index=idx, **kw)
    parts = [kernel_loss(pred[s:s + 3], x1[s:s + 3], t[s:s + 3], v, sample_index=idx[s:s + 3],
                                    v_offset=s, normalizer=9, **kw) for s in (0, 3, 6)]
    ref = [bridge.weighted_bridge_loss(pred[s:s + 3], x1[s:s + 3], t[s:s + 3], v, sample_index=idx[s:s + 3],
                                       v_offset=s, normalizer=9, **kw) for s in (0, 3, 6)]
    for p, r in zip(parts, ref):
        torch.testing.assert_close(p.loss, r.loss, rtol=REDUCTION_FLOOR, atol=0)
        torch.testing.assert_close(p.weights, r.weights, rtol=REDUCTION_FLOOR, atol=1e-6)
    torch.testing.assert_close(sum(p.loss for p in parts), full.loss, rtol=REDUCTION_FLOOR, atol=0)
    torch.testing.assert_close(torch.cat([p.weights for p in parts]), full.weights, rtol=1e-6, atol=0)
    assert full.weights.mean().item() == pytest.approx(1.0, rel=1e-6)


def test_non_contiguous_inputs():
    x1, pred, t, v, idx = make_inputs(3, 3, 12, torch.float32, "mixed", seed=4)
    pred_nc = pred.detach().permute(0, 1, 3, 2).requires_grad_()  # leaf with transposed strides
    x1_nc = torch.cat([x1, x1], dim=3)[..., ::2]                    # strided view
    v_nc = torch.stack([v, v], dim=1)[:, 0]                          # strided V
    assert not pred_nc.is_contiguous() and not x1_nc.is_contiguous() and not v_nc.is_contiguous()
    (fast, g_fast), (ref, g_ref), (ref64, g_64) = run_both(pred_nc, x1_nc, t, v_nc, idx, **LOSS_KW)
    assert_parity("loss", fast.loss, ref.loss, ref64.loss, REDUCTION_FLOOR)
    assert_parity("d loss/d pred", g_fast, g_ref, g_64, ELEMENTWISE_FLOOR)


def test_equal_potentials_and_single_value_give_unit_weights():
    x1, pred, t, _, idx = make_inputs(3, 1, 7, torch.float32, "mixed", seed=5)
    for v in (torch.full((3,), 0.5, device=DEVICE), torch.full((3,), -2.0, device=DEVICE)):
        out = kernel_loss(pred, x1, t, v, seed=SEED, step=STEP, sample_index=idx, **LOSS_KW)
        assert torch.equal(out.weights, torch.ones(3, device=DEVICE))
    out = kernel_loss(pred[:1], x1[:1], t[:1], torch.tensor([3.0], device=DEVICE),
                      seed=SEED, step=STEP, sample_index=idx[:1], **LOSS_KW)
    assert torch.equal(out.weights, torch.ones(1, device=DEVICE))


def test_backward_rescales_by_grad_output_and_no_grad_path():
    x1, pred, t, v, idx = make_inputs(3, 3, 7, torch.float32, "mixed", seed=6)
    kw = dict(seed=SEED, step=STEP, sample_index=idx, **LOSS_KW)
    p = pred.clone().requires_grad_()
    (3.5 * kernel_loss(p, x1, t, v, **kw).loss).backward()
    q = pred.clone().requires_grad_()
    (3.5 * bridge.weighted_bridge_loss(q, x1, t, v, **kw).loss).backward()
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        no_grad = kernel_loss(p, x1, t, v, **kw)
    assert not no_grad.loss.requires_grad
    torch.testing.assert_close(no_grad.loss, bridge.weighted_bridge_loss(pred, x1, t, v, **kw).loss,
                               rtol=REDUCTION_FLOOR, atol=0)


def test_training_step_gradients_match():
    """A conv net on the kernel's x_t, trained on the fused loss, gets the reference's gradients."""
    x1, _, t, v, idx = make_inputs(4, 3, 8, torch.float32, "mixed", seed=7)
    grads = []
    for use_kernels in (True, False):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEVICE)
        kw = dict(seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
        if use_kernels:
            xt = K.bridge_sample(x1, t, **kw)
            loss = kernel_loss(net(xt), x1, t, v, **kw, **LOSS_CHOICES).loss
        else:
            xt = bridge.bridge_sample(x1, t, *bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, DEVICE), 0.5)
            loss = bridge.weighted_bridge_loss(net(xt), x1, t, v, **kw, **LOSS_CHOICES).loss
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g_fast, g_ref in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the GPU launch layout

@pytest.mark.parametrize("block,programs", [(16, None), (16, 5), (64, 2)])
def test_many_programs_per_sample(monkeypatch, block, programs):
    """On CUDA a sample is split over many programs (one per 1,024 elements, partial sums added by
    a second kernel); the interpreter normally runs one program per sample. Force that split here,
    with small blocks so small samples span many programs (None: one program per block, as on
    CUDA; a number: fewer programs than blocks, so each loops grid-stride over several)."""
    def split(device, n, interpreted):
        return block, programs or triton.cdiv(n, block)
    monkeypatch.setattr(utils, "launch_config", split)
    check_loss_case(3, 3, 9, torch.float32, "drift", "softmax", "coherent", 2.0, "mixed")  # 243 elements
    check_loss_case(2, 1, 7, torch.bfloat16, "x1", "softmax", "degenerate", math.inf, "near1")
    x1, _, t, _, idx = make_inputs(3, 3, 9, torch.float32, "mixed", seed=1)
    xt = K.bridge_sample(x1, t, seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    ref = bridge.bridge_sample(x1, t, *bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, DEVICE), 0.5)
    torch.testing.assert_close(xt, ref, rtol=1e-6, atol=1e-6)


def test_finalize_reduces_large_partial_tables():
    """The second kernel walks [rows, programs] partial sums in tiles: more rows and more programs
    per row than one tile holds (as at 256² with batch 256 on CUDA) must still add up exactly."""
    module = importlib.import_module("agm_fast.kernels.weighted_bridge_loss")
    gen = torch.Generator().manual_seed(9)
    rows, programs, n = 40, 300, 4 * 300
    partial = torch.rand(rows, programs, generator=gen, dtype=torch.float64)
    weights = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    per_sample = torch.full((rows,), float("nan"), dtype=torch.float32, device=DEVICE)
    loss = torch.full((), float("nan"), dtype=torch.float32, device=DEVICE)
    block_k, block_b = 256, 32  # the wrapper's choice for 300 programs: 2 column and 2 row steps
    module._finalize_kernel[(1,)](partial.float().to(DEVICE), weights.float().to(DEVICE), per_sample, loss,
                                  rows, programs, float(n), 7.0, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=8)
    want = partial.sum(dim=1) / n
    torch.testing.assert_close(per_sample.double().cpu(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double().cpu(), (weights * want).sum() / 7.0, rtol=1e-5, atol=0)


def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    """The interpreter never lowers a kernel to PTX: compile each variant the wrappers launch on
    CUDA ahead of time (Triton's compiler and ptxas, no GPU needed), in a process without
    TRITON_INTERPRET."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "agm_fast.kernels.compile_check", "--json", "--arch", "80", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.stdout.strip(), f"compile_check printed nothing (rc={res.returncode}): {res.stderr[-2000:]}"
    rows = json.loads(res.stdout)
    failed = [f"{r['arch']} {r['kernel']} [{r['variant']}]: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert res.returncode == 0, res.stderr[-2000:]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_bridge_sample_kernel", "_weighted_bridge_loss_kernel", "_finalize_kernel",
                       "_noise_sum_kernel", "_gn_silu_fwd_kernel", "_gn_silu_bwd_kernel"}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}


# ----------------------------------------------------------------------------- bad input

class _MustNotLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for bad input")


def _good_args():
    x1, pred, t, v, idx = make_inputs(3, 1, 5, torch.float32, "mixed", seed=8)
    return dict(pred=pred, x1=x1, t=t, v=v, seed=SEED, step=STEP, sample_index=idx, **LOSS_KW)


LOSS_BAD = [
    ("pred", lambda a: a["pred"][:, :, :4], ValueError, "same shape"),
    ("pred", lambda a: a["pred"].to(torch.int32), TypeError, "pred must have dtype"),
    ("pred", lambda a: a["pred"].double(), TypeError, "pred must have dtype"),
    ("x1", lambda a: a["x1"].to(torch.int64), TypeError, "x1 must have dtype"),
    ("v", lambda a: a["v"][:2], ValueError, "v holds 2 values"),
    ("v", lambda a: a["v"].to(torch.int64), TypeError, "v must be a floating"),
    ("t", lambda a: torch.tensor([0.1, float("nan"), 0.2], device=DEVICE), ValueError, "t must be finite"),
    ("t", lambda a: torch.tensor([0.1, float("inf"), 0.2], device=DEVICE), ValueError, "t must be finite"),
    ("t", lambda a: torch.tensor([0.1, 1.0, 0.2], device=DEVICE), ValueError, r"t must be finite and in \[0, 1\)"),
    ("t", lambda a: torch.tensor([-0.1, 0.5, 0.2], device=DEVICE), ValueError, r"in \[0, 1\)"),
    ("t", lambda a: a["t"][:2], ValueError, "one time per sample"),
    ("sample_index", lambda a: a["sample_index"][:2], ValueError, "sample_index must hold"),
    ("sample_index", lambda a: a["sample_index"].double(), TypeError, "sample_index must be an integer"),
    ("sample_index", lambda a: [0, 1, 2**32], ValueError, r"\[0, 2\*\*32\)"),
    ("seed", lambda a: -1, ValueError, "seed must be"),
    ("step", lambda a: 2**32, ValueError, "step must be"),
    ("sigma", lambda a: float("nan"), ValueError, "sigma must be"),
    ("predicts", lambda a: "eps", ValueError, "predicts must be 'drift' or 'x1', got 'eps'"),
    ("scheme", lambda a: "topk", ValueError, "scheme must be 'softmax' or 'uniform', got 'topk'"),
    ("favour", lambda a: "both", ValueError, "favour must be 'coherent' or 'degenerate', got 'both'"),
    ("tau", lambda a: 0.0, ValueError, "tau must be > 0"),
    ("clip", lambda a: -1.0, ValueError, "clip must be >= 0"),
    ("v_offset", lambda a: -1, ValueError, "v_offset must be"),
    ("v_offset", lambda a: 1, ValueError, r"v\[1:4\]"),
    ("normalizer", lambda a: 0.0, ValueError, "normalizer must be > 0"),
]


@pytest.mark.parametrize("arg,make,exc,match", LOSS_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(LOSS_BAD)])
def test_loss_bad_input_fails_before_launch(monkeypatch, arg, make, exc, match):
    module = importlib.import_module("agm_fast.kernels.weighted_bridge_loss")
    monkeypatch.setattr(module, "_weighted_bridge_loss_kernel", _MustNotLaunch())
    args = _good_args()
    args[arg] = make(args)
    with pytest.raises(exc, match=match):
        kernel_loss(**args)


def test_x1_requiring_grad_is_refused():
    args = _good_args()
    args["x1"] = args["x1"].clone().requires_grad_()
    with pytest.raises(ValueError, match="x1 must not require grad"):
        kernel_loss(**args)


@pytest.mark.parametrize("change,exc,match", [
    (dict(x1=torch.zeros(4)), ValueError, "at least 2 dims"),
    (dict(x1=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "x1 must have dtype"),
    (dict(t=torch.tensor([0.5, float("nan")])), ValueError, "t must be finite"),
    (dict(sigma=-1.0), ValueError, "sigma must be"),
])
def test_bridge_sample_bad_input(monkeypatch, change, exc, match):
    module = importlib.import_module("agm_fast.kernels.bridge_sample")
    monkeypatch.setattr(module, "_bridge_sample_kernel", _MustNotLaunch())
    args = dict(x1=torch.zeros(2, 3, device=DEVICE), t=torch.tensor([0.1, 0.2], device=DEVICE),
                seed=1, step=2, sample_index=torch.tensor([0, 1], device=DEVICE), sigma=0.5)
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(exc, match=match):
        K.bridge_sample(**args)


def test_kernels_import_only_rng_and_checks():
    """Dependency direction (docs/design.md §4): the kernels import agm_fast.rng, agm_fast.checks and
    their own modules, never the reference math or the config."""
    import subprocess
    import sys
    code = ("import sys, agm_fast.kernels.bridge_sample, agm_fast.kernels.weighted_bridge_loss; "
            "print(sorted(m for m in sys.modules if m.startswith('agm_fast')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(res.stdout))
    assert {m for m in loaded if not m.startswith("agm_fast.kernels")} == {"agm_fast", "agm_fast.rng",
                                                                             "agm_fast.checks"}


def test_available_says_why():
    ok, why = K.available()
    assert isinstance(why, str) and why
    if DEVICE.type == "cpu":
        assert not ok and "CUDA" in why
        assert K.interpreter_active()


# ----------------------------------------------------------------------------- CUDA: full matrix

@needs_cuda
def test_cuda_is_native():
    ok, why = K.available()
    assert ok, why
    assert not K.interpreter_active()


@needs_cuda
@pytest.mark.parametrize("b,c,h", list(itertools.product([1, 3, 64], [1, 3], [7, 28, 32, 64])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t_kind", ["near0", "near1", "mixed"])
def test_cuda_full_matrix(b, c, h, dtype, t_kind):
    for i, (predicts, scheme, favour, clip) in enumerate(itertools.product(
            ["drift", "x1"], ["softmax", "uniform"], ["coherent", "degenerate"], [2.0, math.inf])):
        check_loss_case(b, c, h, dtype, predicts, scheme, favour, clip, t_kind, seed=i)
    x1, _, t, _, idx = make_inputs(b, c, h, dtype, t_kind, seed=99)
    xt = K.bridge_sample(x1, t, seed=SEED, step=STEP, sample_index=idx, sigma=0.5)
    x0, eps = bridge.draw_bridge_noise(SEED, STEP, idx, x1.shape, DEVICE)
    ref64 = bridge.bridge_sample(x1.double(), t.double(), x0.double(), eps.double(), 0.5)
    assert_parity("x_t", xt, bridge.bridge_sample(x1, t, x0, eps, 0.5).to(dtype), ref64, ELEMENTWISE_FLOOR)


@needs_cuda
def test_cuda_large_batch_and_long_v():
    """More blocks per sample than one finalize tile, and len(V) > one V block."""
    check_loss_case(256, 3, 64, torch.bfloat16, "drift", "softmax", "coherent", 2.0, "mixed")
    x1, pred, t, _, idx = make_inputs(32, 3, 256, torch.float32, "mixed", n_v=3000)
    v = torch.randn(3000, device=DEVICE)
    kw = dict(**LOSS_KW, v_offset=1000, normalizer=3000.0)
    (fast, g_fast), (ref, g_ref), (ref64, g_64) = run_both(pred, x1, t, v, idx, **kw)
    assert_parity("loss", fast.loss, ref.loss, ref64.loss, REDUCTION_FLOOR)
    torch.testing.assert_close(fast.weights, ref.weights, rtol=REDUCTION_FLOOR, atol=1e-6)
    assert_parity("d loss/d pred", g_fast, g_ref, g_64, ELEMENTWISE_FLOOR)


# ----------------------------------------------------------------------------- normalise = t_bins

def make_t_all(kind, n, gen):
    """The whole optimiser batch's t: 'ties' repeats a few values (ranks broken by position)."""
    if kind == "ties":
        return (torch.randint(0, 3, (n,), generator=gen).float() * 0.3 + 0.05).to(DEVICE)
    return make_t(kind, n, gen).to(DEVICE)


def check_t_bins_case(b, k, c, h, w, dtype, predicts, favour, clip, t_kind, n_v=None, v_offset=0, seed=0):
    n_v = b if n_v is None else n_v
    x1, pred, _, v, idx = make_inputs(b, c, h, dtype, "mixed", n_v=n_v, seed=seed, w=w)
    gen = torch.Generator().manual_seed(seed + 100)
    t_all = make_t_all(t_kind, n_v, gen)
    t = t_all[v_offset: v_offset + b]
    kw = dict(sigma=0.5, predicts=predicts, scheme="softmax", favour=favour, tau=0.7, clip=clip,
              normalise="t_bins", t_bins=k, t_all=t_all, v_offset=v_offset, normalizer=float(n_v))
    (fast, g_fast), (ref, g_ref), (ref64, g_64) = run_both(pred, x1, t, v, idx, **kw)
    assert fast.weights.shape == (b,) and g_fast.dtype == pred.dtype
    want = bridge.importance_weights(v, scheme="softmax", favour=favour, tau=0.7, clip=clip, normalise="t_bins",
                                     t=t_all, t_bins=k)[v_offset: v_offset + b]
    torch.testing.assert_close(ref.weights, want, rtol=0, atol=0)
    torch.testing.assert_close(fast.weights, ref.weights, rtol=REDUCTION_FLOOR, atol=1e-6)
    assert_parity("loss", fast.loss, ref.loss, ref64.loss, REDUCTION_FLOOR)
    assert_parity("per_sample", fast.per_sample, ref.per_sample, ref64.per_sample, REDUCTION_FLOOR)
    assert_parity("d loss/d pred", g_fast, g_ref, g_64, ELEMENTWISE_FLOOR)
    return fast


# B = 1, B not a multiple of K, K = 1 (the batch path), K ≥ B (bins of one), ties in t, odd shapes,
# bf16/fp32, both favours, clip on/off, both targets
T_BINS_CASES = [
    # b, k, c, h, w, dtype, predicts, favour, clip, t_kind
    (1, 4, 1, 7, 7, torch.float32, "drift", "coherent", 2.0, "mixed"),
    (10, 4, 3, 5, 9, torch.bfloat16, "drift", "degenerate", math.inf, "ties"),
    (13, 3, 1, 7, 3, torch.float32, "x1", "coherent", 0.5, "near1"),
    (16, 4, 3, 8, 8, torch.bfloat16, "x1", "degenerate", 2.0, "mixed"),
    (23, 5, 1, 6, 5, torch.float32, "drift", "coherent", math.inf, "ties"),
    (9, 2, 3, 7, 7, torch.float32, "drift", "degenerate", 2.0, "near0"),
    (6, 1, 1, 7, 7, torch.bfloat16, "drift", "coherent", 2.0, "mixed"),
    (5, 5, 1, 7, 7, torch.float32, "drift", "coherent", 2.0, "mixed"),
    (5, 8, 1, 7, 7, torch.bfloat16, "x1", "degenerate", 2.0, "ties"),
]


@pytest.mark.parametrize("b,k,c,h,w,dtype,predicts,favour,clip,t_kind", T_BINS_CASES)
def test_t_bins_loss_matches_reference(b, k, c, h, w, dtype, predicts, favour, clip, t_kind):
    fast = check_t_bins_case(b, k, c, h, w, dtype, predicts, favour, clip, t_kind)
    if k >= b:  # every sample alone in its bin
        assert torch.equal(fast.weights, torch.ones(b, device=DEVICE))


def test_t_bins_micro_batches_and_long_v():
    """Chunks of a longer optimiser batch (v_offset, t_all of the whole batch), with len(V) beyond one
    interpreter tile (256) so the ranking loops over tiles."""
    for v_offset in (0, 3, 298):
        check_t_bins_case(2, 4, 1, 5, 5, torch.float32, "drift", "coherent", 2.0, "ties", n_v=300,
                          v_offset=v_offset, seed=v_offset)
    check_t_bins_case(3, 7, 3, 4, 4, torch.bfloat16, "drift", "degenerate", math.inf, "mixed", n_v=41,
                      v_offset=17, seed=2)


def test_t_bins_gpu_tiles_and_many_programs(monkeypatch):
    """The CUDA layout under the interpreter: [16, 64] ranking tiles (len(V) = 70 needs 5 row steps and
    2 column steps) and several programs per sample, each computing the weight itself."""
    module = importlib.import_module("agm_fast.kernels.weighted_bridge_loss")
    monkeypatch.setattr(module, "_t_bin_tiles", lambda n_v, interpreted: (16, 64))
    monkeypatch.setattr(utils, "launch_config", lambda device, n, interpreted: (16, triton.cdiv(n, 16)))
    check_t_bins_case(3, 3, 1, 7, 7, torch.float32, "drift", "coherent", 2.0, "ties", n_v=70, v_offset=40)
    check_t_bins_case(2, 20, 1, 5, 5, torch.bfloat16, "drift", "degenerate", 1.0, "mixed", n_v=70, v_offset=0)


def test_t_bins_chunks_add_up_and_batch_path_unchanged():
    x1, pred, t, v, idx = make_inputs(9, 3, 7, torch.float32, "mixed", seed=3)
    kw = dict(seed=SEED, step=STEP, sigma=0.5, predicts="drift", scheme="softmax", favour="coherent",
              tau=0.5, clip=1.5)
    tb = dict(normalise="t_bins", t_bins=3, t_all=t)
    full = kernel_loss(pred, x1, t, v, sample_index=idx, **kw, **tb)
    parts = [kernel_loss(pred[s:s + 3], x1[s:s + 3], t[s:s + 3], v, sample_index=idx[s:s + 3],
                         v_offset=s, normalizer=9, **kw, **tb) for s in (0, 3, 6)]
    torch.testing.assert_close(sum(p.loss for p in parts), full.loss, rtol=REDUCTION_FLOOR, atol=0)
    torch.testing.assert_close(torch.cat([p.weights for p in parts]), full.weights, rtol=1e-6, atol=0)
    assert full.weights.mean().item() == pytest.approx(1.0, rel=1e-6)
    # normalise=batch ignores t_all and t_bins: bit-identical to the call without them
    plain = kernel_loss(pred, x1, t, v, sample_index=idx, **kw)
    batch = kernel_loss(pred, x1, t, v, sample_index=idx, normalise="batch", t_bins=3, t_all=t, **kw)
    assert torch.equal(plain.weights, batch.weights) and torch.equal(plain.loss, batch.loss)
    assert not torch.allclose(full.weights, plain.weights)
    uniform = kernel_loss(pred, x1, t, v, sample_index=idx, **dict(kw, scheme="uniform"), **tb)
    assert torch.equal(uniform.weights, torch.ones(9, device=DEVICE))


@pytest.mark.parametrize("change,exc,match", [
    (dict(normalise="rank"), ValueError, "normalise must be 'batch' or 't_bins', got 'rank'"),
    (dict(t_bins=0), ValueError, "t_bins must be an integer >= 1"),
    (dict(t_bins=2.0), ValueError, "t_bins must be an integer >= 1"),
    (dict(t_all=None), TypeError, "needs t_all"),
    (dict(t_all="short"), ValueError, "t_all holds 2 times but v holds 3"),
    (dict(t_all="long_v", t_bins=1025), ValueError, "t_bins <= 1024"),
])
def test_t_bins_bad_input_fails_before_launch(monkeypatch, change, exc, match):
    module = importlib.import_module("agm_fast.kernels.weighted_bridge_loss")
    monkeypatch.setattr(module, "_weighted_bridge_loss_kernel", _MustNotLaunch())
    args = _good_args()
    args.update(normalise="t_bins", t_bins=2, t_all=args["t"])
    args.update(change)
    if isinstance(args["t_all"], str) and args["t_all"] == "short":
        args["t_all"] = args["t"][:2]
    elif isinstance(args["t_all"], str):  # long_v
        args["v"] = torch.randn(2000, device=DEVICE)
        args["t_all"] = torch.rand(2000, device=DEVICE)
    with pytest.raises(exc, match=match):
        kernel_loss(**args)
