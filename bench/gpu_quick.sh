#!/usr/bin/env bash
# The most important GPU measurements, most important first, in ≤ 8 minutes on an H100, so a
# 15-minute device budget (start-up included) always yields results. Run from the repo root on the GPU machine:
#   bash bench/gpu_quick.sh            (results: bench/results/*.json, copied to $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
# 1. build agm_fast._C against the machine's CUDA torch (no network there: no isolation, no deps)
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
$PY -m agm_fast.cli info --device cuda
# 2. correctness of the CUDA paths (kernel parity incl. channels_last and GroupNorm+SiLU, EM op,
#    CUDA-graph sampler, compiled and graph-captured training step); no -x: every failure is listed
timeout 270 $PY -m pytest -q -ra tests/test_kernels.py tests/test_kernels_channels_last.py tests/test_group_norm.py \
  tests/test_em_op.py tests/test_sampler.py tests/test_step_fast.py 2>&1 | tail -25
# 3. timings: fused loss + bridge kernels, then the EM op and the sampler
timeout 150 $PY bench/bench_loss_kernel.py --quick
timeout 120 $PY bench/bench_em.py --quick
# 4. the whole AGM step at 64², batch 64 (celeba64 nets): bf16 eager, + channels_last, + fused norm,
#    + compile (nets), + CUDA graph; AGM first, then drift-only. Rows are written as they finish, so a
#    timeout keeps those done; the second scheme's compiles mostly hit inductor's cache. It gets what
#    is left of the 8 minutes (SECONDS: bash's clock since the script started).
left=$((470 - SECONDS))
if [ "$left" -gt 60 ]; then
  timeout "$left" $PY bench/bench_step.py --quick --device cuda --preset celeba64 --batch 64 \
    --rows bf16,channels_last,fused_norm,compile,cuda_graph
else
  echo "bench_step.py skipped: only ${left}s left of the 8-minute budget"
fi
if [ -n "${OUT:-}" ]; then cp bench/results/*.json bench/results/*.md bench/results/*.png "$OUT"/ 2>/dev/null; fi
