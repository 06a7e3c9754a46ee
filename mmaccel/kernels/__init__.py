"""Triton kernels for mmaccel's hot paths, each with a torch reference of the same signature.

Dispatch picks Triton on CUDA tensors when triton imports, the reference elsewhere. On CPU the
kernels run only under ``TRITON_INTERPRET=1`` (set before this package is imported), which is
how the tests compare them with the references.
"""
from .query_scores import query_scores, query_scores_reference

__all__ = ["query_scores", "query_scores_reference"]
