"""Triton kernels against their torch references, in the interpreter on tiny shapes (fp32/fp16)."""
import os

import pytest
import torch

from mmaccel.kernels import query_scores, query_scores_reference

triton = pytest.importorskip("triton")
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU runs of Triton kernels need TRITON_INTERPRET=1 at import")


@needs_interpreter
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_query_scores_kernel_matches_reference(dtype, tol, with_bias):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 16).to(dtype)
    k = torch.randn(2, 2, 70, 16).to(dtype)  # GQA and a key count that is not a block multiple
    bias = None
    if with_bias:
        bias = torch.zeros(2, 1, 3, 70)
        bias[0, :, :, :5] = float("-inf")  # padding keys
        bias[1, :, 1, 40:] = float("-inf")  # a causal-style cut for one row
    got = query_scores(q, k, bias, 0.25, backend="triton")
    ref = query_scores_reference(q, k, bias, 0.25)
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, 3), atol=tol, rtol=tol)


def test_dispatch_uses_the_reference_unless_triton_is_asked():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    assert torch.equal(query_scores(q, k, None, 0.5), query_scores_reference(q, k, None, 0.5))
    with pytest.raises(ValueError, match="unknown backend"):
        query_scores(q, k, None, 0.5, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_query_scores_kernel_on_gpu_bf16():
    q = torch.randn(2, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 1000, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(query_scores(q, k, None, 0.125, backend="triton"),
                               query_scores_reference(q, k, None, 0.125), atol=2e-2, rtol=2e-2)
