"""agm_fast._C: the fused Euler–Maruyama op against the PyTorch reference and agm_fast.rng."""

import os
import shutil
import subprocess
import textwrap

import pytest
import torch

from agm_fast import ext, rng
from tests.conftest import needs_cuda, skip_unless_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1, 1, 1, 1), (3, 3, 5, 7), (2, 1, 28, 28), (4, 3, 9, 13), (5, 3, 8, 8)]  # odd numel, batch 1, C=1,3
DT, SIGMA = 1.0 / 200, 0.5


@pytest.fixture(autouse=True)
def _need_ext():
    ok, why = ext.available("cpu")
    skip_unless_available("ext", ok, why)


def _inputs(shape, dtype=torch.float32, drift_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    drift = (3 * torch.randn(shape, generator=g)).to(drift_dtype or dtype)
    z = torch.randn(shape, generator=g)
    return x, drift, z


def _reference(x, drift, z, dt, sigma, out_dtype, acc=torch.float32):
    """The same arithmetic in `acc` precision, rounded to out_dtype (one rounding per op)."""
    v = x.to(acc) + drift.to(acc) * dt
    if z is not None:
        v = v + (sigma * dt ** 0.5) * z.to(acc)
    return v.to(out_dtype)


def test_philox_header_known_answers(tmp_path):
    """csrc/philox.h against Random123's vectors and rng.philox4x32, compiled on its own."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the philox.h known-answer check")
    src = tmp_path / "kat.cpp"
    src.write_text(textwrap.dedent("""
        #include <cstdio>
        #include "philox.h"
        int main() {
          unsigned c[4], k[2];
          while (std::scanf("%u %u %u %u %u %u", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) == 6) {
            agm::Philox4 p = agm::philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
            std::printf("%u %u %u %u\\n", p.r[0], p.r[1], p.r[2], p.r[3]);
          }
        }"""))
    exe = tmp_path / "kat"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{ROOT}/csrc", str(src), "-o", str(exe)], check=True)
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # random counters/keys, expected values from rng.py
        w = [int(v) for v in torch.randint(0, 2**32, (6,), generator=g, dtype=torch.int64)]
        out = rng.philox4x32(*[torch.tensor(v) for v in w[:4]], w[4], w[5])
        cases.append((tuple(w[:4]), tuple(w[4:]), tuple(int(o) for o in out)))
    stdin = "".join(" ".join(str(v) for v in (*c, *k)) + "\n" for c, k, _ in cases)
    res = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("\n")
    for (c, k, expected), line in zip(cases, res):
        assert tuple(int(v) for v in line.split()) == expected, (c, k)


def _cuda_include_dir():
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    for root in (os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                 "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    """em_step.cpp with AGM_WITH_CUDA (the torch side of the CUDA op: checks, dtype codes, stream,
    registration) is only built on a CUDA machine: compile it here with the CPU torch's headers.
    The CPU wheel lacks one generated CUDA header, which only sets a build macro: stub it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_include = _cuda_include_dir()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (nvcc's include folder)")
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-fno-math-errno", "-w", "-DAGM_WITH_CUDA",
           *[f"-I{p}" for p in include_paths()], f"-I{tmp_path}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{cuda_include}", f"-I{ROOT}/csrc", f"{ROOT}/csrc/em_step.cpp"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("shape", SHAPES)
def test_z_variant_matches_reference_fp32(shape):
    x, drift, z = _inputs(shape)
    want = _reference(x, drift, z, DT, SIGMA, torch.float32)
    got = x.clone()
    out = ext.em_step_z_(got, drift, z, dt=DT, sigma=SIGMA)
    assert out is got
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,drift_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (2, 1, 28, 28)])
def test_z_variant_low_precision_parity_rule(shape, dtype, drift_dtype):
    """Parity rule: |op − fp64| ≤ 2·|torch same-dtype reference − fp64| + floor (elementwise max)."""
    x, drift, z = _inputs(shape, dtype, drift_dtype)
    exact = _reference(x, drift, z, DT, SIGMA, torch.float64, acc=torch.float64)
    torch_ref = _reference(x, drift, z, DT, SIGMA, dtype)
    got = x.clone()
    ext.em_step_z_(got, drift, z, dt=DT, sigma=SIGMA)
    err_op = (got.double() - exact).abs().max().item()
    err_ref = (torch_ref.double() - exact).abs().max().item()
    assert err_op <= 2 * err_ref + 1e-6, (err_op, err_ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_in_op_noise_equals_rng(shape):
    """x = 0, drift = 0, dt = 1, σ = 1 leaves exactly z: compare with rng.normal (stream EM)."""
    for seed, step, base in [(0, 0, 0), (123456789012, 7, 10), (2**64 - 1, 2**32 - 1, 2**32 - shape[0])]:
        x = torch.zeros(shape)
        ext.em_step_(x, torch.zeros(shape), dt=1.0, sigma=1.0, seed=seed, step=step, image_index=base)
        idx = torch.arange(base, base + shape[0])
        z = rng.normal(seed, step, idx, x[0].numel(), rng.Stream.EM).reshape(shape)
        # log/cos/sin of the C library vs PyTorch's vectorised ones differ in the last ulp
        torch.testing.assert_close(x, z, rtol=1e-6, atol=2e-6)


def test_image_index_tensor_keys_rows():
    shape = (4, 3, 5, 5)
    idx = torch.tensor([9, 2, 40, 7])
    x = torch.zeros(shape)
    ext.em_step_(x, torch.zeros(shape), dt=1.0, sigma=1.0, seed=5, step=3, image_index=idx)
    z = rng.normal(5, 3, idx, 75, rng.Stream.EM).reshape(shape)
    torch.testing.assert_close(x, z, rtol=1e-6, atol=2e-6)
    # the same image index gives the same noise in any batch position, and the step tensor form works
    y = torch.zeros((1, 3, 5, 5))
    ext.em_step_(y, torch.zeros_like(y), dt=1.0, sigma=1.0, seed=5, step=torch.tensor([3]),
                 image_index=torch.tensor([40]))
    assert torch.equal(y[0], x[2])


def test_full_step_matches_reference_with_rng_noise():
    shape = (3, 3, 9, 13)
    x, drift, _ = _inputs(shape)
    z = rng.normal(11, 42, torch.arange(5, 8), x[0].numel(), rng.Stream.EM).reshape(shape)
    want = _reference(x, drift, z, DT, SIGMA, torch.float32)
    got = x.clone()
    ext.em_step_(got, drift, dt=DT, sigma=SIGMA, seed=11, step=42, image_index=5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- CPU noise generators
# The CPU op draws its noise with an AVX2 tile generator where the CPU has AVX2 + FMA (polynomial
# log/sin/cos) and with the scalar one (libm) otherwise; torch.ops.agm_fast._em_step_cpu_ runs
# em_step_ with either, so both are checked here whatever em_step_ picks on this machine.

def _cpu_noise_generators():
    return ["scalar"] + (["avx2"] if getattr(ext._C, "CPU_NOISE", "scalar") == "avx2" else [])


def _step_with(noise, x, drift, *, dt, sigma, seed, step, image_index):
    lo, hi = rng.split_seed(seed)
    torch.ops.agm_fast._em_step_cpu_(x, drift, image_index, torch.tensor([step]), dt, sigma, lo, hi, noise)
    return x


@pytest.mark.parametrize("noise", ["scalar", "avx2"])
def test_cpu_noise_generators_equal_rng(noise):
    """Large odd batch; row sizes around the 4-element block, the 8-block chunk and the 64-block tile."""
    if noise not in _cpu_noise_generators():
        pytest.skip("this CPU has no AVX2 + FMA: only the scalar noise generator runs here")
    g = torch.Generator().manual_seed(3)
    for numel, batch in [(1, 3), (3, 2), (5, 1), (31, 2), (33, 3), (255, 2), (257, 3), (259, 1), (1021, 2),
                         (3 * 173 * 211, 5)]:
        idx = torch.randint(0, 2**32, (batch,), generator=g, dtype=torch.int64)
        for seed, step in [(0, 0), (2**64 - 1, 2**32 - 1), (0x9E3779B97F4A7C15, 123)]:
            x = _step_with(noise, torch.zeros(batch, numel), torch.zeros(batch, numel), dt=1.0, sigma=1.0,
                           seed=seed, step=step, image_index=idx)
            z = rng.normal(seed, step, idx, numel, rng.Stream.EM)
            torch.testing.assert_close(x, z, rtol=1e-6, atol=2e-6, msg=lambda m: f"{numel=} {seed=} {step=}: {m}")
            # tighter, also for small |z|: both sides are within ~3 ulp of the exact normal
            ulp = torch.nextafter(z.abs(), torch.tensor(float("inf"))) - z.abs()
            assert ((x - z).abs() / ulp).max() <= 8, (numel, seed, step)


def test_cpu_noise_generators_agree_and_em_step_uses_avx2_where_supported():
    shape = (5, 3, 37, 29)  # row of 3219 elements: 12 full tiles and a partial one
    x, drift, _ = _inputs(shape)
    kw = dict(dt=DT, sigma=SIGMA, seed=77, step=5, image_index=torch.arange(8, 13))
    got = {noise: _step_with(noise, x.clone(), drift, **kw) for noise in _cpu_noise_generators() + ["auto"]}
    best = "avx2" if "avx2" in got else "scalar"
    torch.testing.assert_close(got[best], got["scalar"], rtol=1e-6, atol=1e-6)
    assert torch.equal(ext.em_step_(x.clone(), drift, **kw), got["auto"])
    assert torch.equal(got["auto"], got[best])
    with pytest.raises(RuntimeError, match="noise generator must be"):
        _step_with("fast", x.clone(), drift, **kw)


@pytest.mark.parametrize("noise", ["scalar", "avx2"])
@pytest.mark.parametrize("dtype,drift_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_in_op_noise_low_precision_parity_rule(noise, dtype, drift_dtype):
    """Parity rule with in-op noise: |op − fp64| ≤ 2·|torch same-dtype reference − fp64| + floor."""
    if noise not in _cpu_noise_generators():
        pytest.skip("this CPU has no AVX2 + FMA: only the scalar noise generator runs here")
    shape = (3, 3, 17, 19)
    x, drift, _ = _inputs(shape, dtype, drift_dtype)
    z = rng.normal(4, 9, torch.arange(2, 5), x[0].numel(), rng.Stream.EM).reshape(shape)
    exact = _reference(x, drift, z, DT, SIGMA, torch.float64, acc=torch.float64)
    torch_ref = _reference(x, drift, z, DT, SIGMA, dtype)
    got = _step_with(noise, x.clone(), drift, dt=DT, sigma=SIGMA, seed=4, step=9, image_index=torch.arange(2, 5))
    err_op = (got.double() - exact).abs().max().item()
    err_ref = (torch_ref.double() - exact).abs().max().item()
    assert err_op <= 2 * err_ref + 1e-6, (err_op, err_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_step_adds_no_noise(dtype):
    x, drift, _ = _inputs((3, 3, 5, 7), dtype)
    got = x.clone()
    ext.em_step_last_(got, drift, dt=DT)
    assert torch.equal(got, _reference(x, drift, None, DT, 0.0, dtype))


def test_in_place_keeps_storage():
    x, drift, _ = _inputs((2, 3, 8, 8))
    before = x.clone()
    ptr, version = x.data_ptr(), x._version
    out = ext.em_step_(x, drift, dt=DT, sigma=SIGMA, seed=0, step=0, image_index=0)
    assert out is x and x.data_ptr() == ptr and x._version > version
    assert not torch.equal(x, before)


def test_non_contiguous_inputs_are_handled():
    base, drift, _ = _inputs((3, 5, 7, 4))
    x = base.permute(0, 3, 1, 2)  # non-contiguous [3, 4, 5, 7] view into base
    d = drift.permute(0, 3, 1, 2)
    want = x.contiguous()
    ext.em_step_(want, d.contiguous(), dt=DT, sigma=SIGMA, seed=1, step=2, image_index=0)
    ext.em_step_(x, d, dt=DT, sigma=SIGMA, seed=1, step=2, image_index=0)
    assert torch.equal(x, want)  # the view (and so `base`) was updated
    with pytest.raises(RuntimeError, match="contiguous"):  # the raw op refuses a non-contiguous x
        torch.ops.agm_fast.em_step_last_(base.permute(0, 3, 1, 2), d, DT)


def test_bad_inputs_give_clear_errors():
    x, drift, _ = _inputs((2, 3, 4, 4))
    kw = dict(dt=DT, sigma=SIGMA, seed=0, step=0, image_index=0)
    with pytest.raises(ValueError, match="drift shape"):
        ext.em_step_(x, drift[:1], **kw)
    with pytest.raises(TypeError, match="x must be float32"):
        ext.em_step_(x.double(), drift, **kw)
    with pytest.raises(ValueError, match="dt must be"):
        ext.em_step_(x, drift, **{**kw, "dt": 0.0})
    with pytest.raises(ValueError, match="sigma"):
        ext.em_step_(x, drift, **{**kw, "sigma": -1.0})
    with pytest.raises(ValueError, match="step must be"):
        ext.em_step_(x, drift, **{**kw, "step": -1})
    with pytest.raises(ValueError, match="image_index tensor"):
        ext.em_step_(x, drift, **{**kw, "image_index": torch.arange(3)})
    with pytest.raises(ValueError, match="seed"):
        ext.em_step_(x, drift, **{**kw, "seed": 2**64})
    with pytest.raises(ValueError, match="z must be"):
        ext.em_step_z_(x, drift, torch.zeros(2, 3), dt=DT, sigma=SIGMA)


def test_opcheck_schema_and_fake_kernels():
    """torch.library.opcheck: schema (mutation of x only), fake kernels, AOT dispatch."""
    x, drift, z = _inputs((2, 3, 5, 5))
    idx, step = torch.arange(2), torch.tensor([4])
    torch.library.opcheck(torch.ops.agm_fast.em_step_.default, (x.clone(), drift, idx, step, DT, SIGMA, 7, 0))
    torch.library.opcheck(torch.ops.agm_fast.em_step_z_.default, (x.clone(), drift, z, DT, SIGMA))
    torch.library.opcheck(torch.ops.agm_fast.em_step_last_.default, (x.clone(), drift, DT))


def test_works_under_torch_compile():
    x, drift, _ = _inputs((2, 3, 6, 6))
    idx, step = torch.arange(2), torch.tensor([1])

    def step_fn(x, drift):
        torch.ops.agm_fast.em_step_(x, drift * 2, idx, step, DT, SIGMA, 3, 0)
        return x

    want = step_fn(x.clone(), drift)
    got = torch.compile(step_fn, backend="aot_eager", fullgraph=True)(x.clone(), drift)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- the CUDA kernel's body, on CPU
# csrc/em_step_kernel.h holds the per-thread body of the CUDA kernel; _em_step_cuda_emulated_ runs
# it on the CPU for every thread index, with the CUDA launcher's choice of vector path, so its
# indexing, tails, vector loads, noise keys and roundings are checked here without a GPU.

def _emulated(x, drift, z, mode, *, seed=9, step=17, image_index=None):
    lo, hi = rng.split_seed(seed)
    idx = torch.arange(3, 3 + x.shape[0]) if image_index is None else image_index
    return torch.ops.agm_fast._em_step_cuda_emulated_(x, drift, z, idx, torch.tensor([step]), DT, SIGMA, lo, hi, mode)


def _misaligned(t):
    """A contiguous copy of t that starts 1 element into its buffer (not 4-element aligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype,drift_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape,layout,vector", [((4, 3, 8, 8), "aligned", True), ((3, 3, 5, 7), "aligned", False),
                                                 ((2, 1, 28, 28), "misaligned", False), ((1, 1, 1, 1), "aligned", False),
                                                 ((5, 3, 1, 4), "aligned", True)])
def test_cuda_kernel_body_emulated_on_cpu(shape, layout, vector, dtype, drift_dtype):
    """Against the fused CPU op (itself checked against rng and the reference above): identical
    for given z and the last step, within the noise tolerance for in-kernel noise."""
    x, drift, z = _inputs(shape, dtype, drift_dtype)
    prep = _misaligned if layout == "misaligned" else (lambda t: t.clone())
    for mode in (0, 1, 2):
        got = prep(x)
        used_vector = _emulated(got, prep(drift), prep(z) if mode == 1 else None, mode)
        assert used_vector == vector
        want = x.clone()
        if mode == 0:
            ext.em_step_(want, drift, dt=DT, sigma=SIGMA, seed=9, step=17, image_index=3)
            # scalar libm noise vs the op's noise generator: a last-ulp difference may flip one
            # rounding of a 16-bit result
            tol = dict(rtol=1e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
            torch.testing.assert_close(got, want, **tol)
        else:
            if mode == 1:
                ext.em_step_z_(want, drift, z, dt=DT, sigma=SIGMA)
            else:
                ext.em_step_last_(want, drift, dt=DT)
            assert torch.equal(got, want), f"mode {mode}"


def test_cuda_kernel_body_noise_equals_rng():
    """x = 0, drift = 0, dt = 1, σ = 1 leaves exactly the kernel's z: rng.normal's, keyed per row."""
    shape, idx = (3, 3, 9, 11), torch.tensor([7, 2**32 - 1, 0])
    for seed, step in [(0, 0), (2**64 - 1, 2**32 - 1)]:
        x = torch.zeros(shape)
        lo, hi = rng.split_seed(seed)
        torch.ops.agm_fast._em_step_cuda_emulated_(x, torch.zeros(shape), None, idx, torch.tensor([step]), 1.0, 1.0,
                                                   lo, hi, 0)
        z = rng.normal(seed, step, idx, x[0].numel(), rng.Stream.EM).reshape(shape)
        torch.testing.assert_close(x, z, rtol=1e-6, atol=2e-6)


# ----------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(64, 3, 64, 64)])
def test_cuda_matches_cpu(shape, dtype):
    ok, why = ext.available("cuda")
    skip_unless_available("ext", ok, why)
    x, drift, z = _inputs(shape, dtype)
    cpu, gpu = x.clone(), x.cuda()
    ext.em_step_(cpu, drift, dt=DT, sigma=SIGMA, seed=9, step=17, image_index=3)
    ext.em_step_(gpu, drift.cuda(), dt=DT, sigma=SIGMA, seed=9, step=torch.tensor([17], device="cuda"),
                 image_index=3)
    tol = dict(rtol=1e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)
    # given z and the last step: identical arithmetic on both devices
    cpu, gpu = x.clone(), x.cuda()
    ext.em_step_z_(cpu, drift, z, dt=DT, sigma=SIGMA)
    ext.em_step_z_(gpu, drift.cuda(), z.cuda(), dt=DT, sigma=SIGMA)
    assert torch.equal(gpu.cpu(), cpu)
    cpu, gpu = x.clone(), x.cuda()
    ext.em_step_last_(cpu, drift, dt=DT)
    ext.em_step_last_(gpu, drift.cuda(), dt=DT)
    assert torch.equal(gpu.cpu(), cpu)


@needs_cuda
def test_cuda_noise_equals_rng_and_graph_replays_advance():
    ok, why = ext.available("cuda")
    skip_unless_available("ext", ok, why)
    shape = (4, 3, 17, 9)
    x = torch.zeros(shape, device="cuda")
    d = torch.zeros_like(x)
    idx, step = torch.arange(4, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
    g = torch.cuda.CUDAGraph()
    torch.ops.agm_fast.em_step_(x, d, idx, step, 1.0, 1.0, 5, 0)  # warm-up
    with torch.cuda.graph(g):
        x.zero_()
        torch.ops.agm_fast.em_step_(x, d, idx, step, 1.0, 1.0, 5, 0)
        step.add_(1)
    step.zero_()
    outs = []
    for _ in range(2):
        g.replay()
        outs.append(x.clone())
    for k, out in enumerate(outs):
        z = rng.normal(5, k, torch.arange(4), x[0].numel(), rng.Stream.EM).reshape(shape)
        torch.testing.assert_close(out.cpu(), z, rtol=1e-6, atol=2e-6)
    assert not torch.equal(outs[0], outs[1])
