"""The native extension's utilities for users: what was built, and its CPU output cache.

The native backend itself lives in ``sn_kernels/backends/native.py``.
"""
from .backends.native import build_info, cache_stats, empty_cache

__all__ = ["build_info", "cache_stats", "empty_cache"]
