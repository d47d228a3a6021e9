"""Triton kernels of agm_fast, imported as agm_fast.kernels."""
