"""The CPU output cache (csrc/cpu/output_cache.cpp).

bn_ext's CPU outputs of 256 KiB and more come from a cache of blocks that earlier outputs freed,
so that a training loop, which asks for the same sizes every step, does not have the OS fault in
and zero fresh pages on every call. Sizes are rounded up to 2 MiB, or to 64 KiB below that. The
cache holds at most BN_EXT_CPU_CACHE_MB MiB (read once, at the first large output; default
min(2048, RAM / 8)); BN_EXT_CPU_CACHE_MB=0 turns it off. CUDA outputs use torch's own caching
allocator.
"""
from __future__ import annotations

from .functional import ops

__all__ = ["empty_cpu_cache", "cpu_cache_stats"]


def empty_cpu_cache() -> None:
    """Gives every cached block back to the OS (outputs still alive are not affected)."""
    ops.empty_cpu_cache()


def cpu_cache_stats() -> dict:
    """cached_bytes and cached_blocks now; limit_bytes; hits and misses since start-up."""
    cached, blocks, limit, hits, misses = ops.cpu_cache_stats()
    return {"cached_bytes": cached, "cached_blocks": blocks, "limit_bytes": limit,
            "hits": hits, "misses": misses}
