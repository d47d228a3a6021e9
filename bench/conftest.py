"""pytest-benchmark cases of bench/ (README "Benchmarks"): CPU-sized timings, never part of
`make test` (pyproject's testpaths is tests/). Run them with
    pytest bench/ --benchmark-only [--benchmark-autosave | --benchmark-compare]
Without pytest-benchmark installed (the `bench` extra of pyproject.toml) nothing here is collected.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton runs on CPU tensors only in interpreter mode, chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

if importlib.util.find_spec("pytest_benchmark") is None:
    collect_ignore_glob = ["test_*.py"]
