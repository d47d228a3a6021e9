"""agm_fast: a fast trainer for Action-Inspired Generative Models."""

__version__ = "0.1.0"
