"""Chunked log-probabilities of the sampled tokens equal the full-vocabulary log-softmax: values, gradients, entropy."""

from __future__ import annotations

import pytest
import torch

from unifer_ray.rl.logprobs import token_logprobs


def full(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])  # one row, a chunk that does not divide, many, all at once
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_full_log_softmax(chunk, temperature):
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 517, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 517, (3, 11))
    weights = torch.randn(3, 11, dtype=torch.float64)  # a loss that weighs tokens differently

    expected, expected_entropy = full(logits, targets, temperature)
    (expected.double() * weights).sum().backward()
    expected_grad = logits.grad.clone()
    logits.grad = None

    got, entropy = token_logprobs(logits, targets, temperature, with_entropy=True, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    (got.double() * weights).sum().backward()
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy.float(), rtol=1e-6, atol=1e-6)
    assert not entropy.requires_grad


def test_bf16_logits_are_read_in_fp32_and_get_a_bf16_gradient():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 300).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 300, (2, 5))
    expected, _ = full(logits.detach().float(), targets, 1.0)  # the reference: the same bf16 values, in fp32
    got, _ = token_logprobs(logits, targets, chunk=3)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().float().requires_grad_()
    full(reference, targets, 1.0)[0].sum().backward()
    torch.testing.assert_close(logits.grad.float(), reference.grad, rtol=1e-2, atol=1e-2)


def fp32_saved_for_backward(fn) -> int:
    """The largest fp32 tensor autograd keeps for the backward pass of fn()."""
    seen = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.float32:
            seen[0] = max(seen[0], tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return seen[0]


def test_no_full_vocabulary_fp32_tensor_is_kept_for_backward():
    rows, vocab, chunk = 64, 4096, 8
    logits = torch.randn(rows, vocab).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    assert fp32_saved_for_backward(lambda: full(logits, targets, 1.0)[0]) >= rows * vocab  # the usual way
    assert fp32_saved_for_backward(lambda: token_logprobs(logits, targets, chunk=chunk)[0]) <= chunk  # log-sum-exps
