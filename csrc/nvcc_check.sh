#!/usr/bin/env bash
# Compile-check the raw CUDA kernel of agm_fast._C for sm_80 (A100) and sm_90 (H100) without a GPU
# and without torch: the .cu file includes only the CUDA toolkit and csrc/philox.h.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${NVCC:-}" ]]; then nvcc="$NVCC"
elif command -v nvcc >/dev/null 2>&1; then nvcc="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc
elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then nvcc="$CUDA_HOME/bin/nvcc"
else echo "nvcc_check: no nvcc found (set NVCC or CUDA_HOME)" >&2; exit 1; fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$nvcc" --version | tail -n 2
for arch in sm_80 sm_90; do
  cmd=("$nvcc" -std=c++17 -O3 -arch="$arch" -Xptxas -v -c "$here/em_step_cuda.cu" -o "$out/em_step_cuda_$arch.o")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" 2>"$out/ptxas_$arch.log" || { cat "$out/ptxas_$arch.log" >&2; echo "nvcc_check: FAILED for $arch" >&2; exit 1; }
  # one summary line per kernel instantiation would be noisy: report the register range
  regs=$(grep -o 'Used [0-9]* registers' "$out/ptxas_$arch.log" | awk '{print $2}' | sort -n | sed -n '1p;$p' | paste -sd- -)
  grep -qi 'spill stores' "$out/ptxas_$arch.log" && spills=$(grep -o '[0-9]* bytes spill stores' "$out/ptxas_$arch.log" | sort -n | tail -1) || spills="n/a"
  echo "nvcc_check: $arch OK (registers per thread: $regs; max spill stores: $spills)"
done
