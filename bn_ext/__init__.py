"""bn_ext: BatchNorm for PyTorch on hand-written C++ (CPU) and CUDA kernels.

    bn_ext.batch_norm            mirrors torch.nn.functional.batch_norm
    bn_ext.BatchNorm1d/2d/3d     drop-in for torch.nn.BatchNorm1d/2d/3d
    bn_ext.LazyBatchNorm1d/2d/3d drop-in for torch.nn.LazyBatchNorm1d/2d/3d
    bn_ext.convert_model         swaps a model's torch BatchNorm layers for bn_ext's
    bn_ext.revert_model          swaps them back (for tools keyed on torch's classes)
    bn_ext.SyncBatchNorm         drop-in for torch.nn.SyncBatchNorm (any torch.distributed backend)
    bn_ext.BatchNormFunction     an autograd.Function over the C++ ops (the layers use C++ autograd)
    bn_ext.ops                   torch.ops.bn_ext, the raw ops
    bn_ext.empty_cpu_cache       gives back the CPU output cache's blocks (bn_ext/memory.py)
    bn_ext.cpu_cache_stats       that cache's size, limit, hits and misses
"""
from .functional import BatchNormFunction, batch_norm, ops
from .memory import cpu_cache_stats, empty_cpu_cache
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d,
                      LazyBatchNorm3d, convert_model, revert_model)
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormFunction

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
           "LazyBatchNorm3d", "BatchNormFunction", "batch_norm",
           "SyncBatchNorm", "SyncBatchNormFunction", "convert_model", "revert_model", "ops",
           "has_cuda_kernels", "cpu_cache_stats", "empty_cpu_cache"]


def has_cuda_kernels() -> bool:
    """Whether this build has bn_ext's CUDA kernels."""
    return ops.built_with_cuda()
