"""Build of agm_fast and its optional compiled extension agm_fast._C (DESIGN.md §4).

`kernels/` is installed as the package `agm_fast.kernels` (one import name everywhere).
The extension is optional: a failed build leaves a working pure-PyTorch install.
"""

from setuptools import setup

setup(
    packages=["agm_fast", "agm_fast.kernels"],
    package_dir={"agm_fast": "agm_fast", "agm_fast.kernels": "kernels"},
    package_data={"agm_fast": ["configs/*.toml"]},
)
