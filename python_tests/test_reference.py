"""torchspec_ext.reference agrees with the ops on a random float32 case each, in the ops' return conventions."""

import pytest
import torch

from torchspec_ext import ops, reference

from conftest import DEVICES


def assert_same_topk(got, want, atol):
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.int64, torch.float32]
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_logprobs(device):
    logits = torch.randn(2, 5, 3000, device=device) * 3
    assert_same_topk(reference.topk_logprobs(logits, 40, 0.8), ops.topk_logprobs(logits, 40, 0.8), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_topk_logprobs(device):
    hidden, weight = torch.randn(7, 48, device=device), torch.randn(5000, 48, device=device) / 7
    want = ops.linear_topk_logprobs(hidden, weight, 16, 0.7)
    assert_same_topk(reference.linear_topk_logprobs(hidden, weight, 16, 0.7), want, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_draft_topk_kl(device):
    n, vocab = 300, 4000
    hidden, weight = torch.randn(n, 32, device=device) * 2, torch.randn(vocab, 32, device=device) / 6
    indices = torch.randint(0, vocab, (n, 8), device=device)
    indices[torch.rand(n, 8, device=device) < 0.3] = -1
    logprobs = torch.log_softmax(torch.randn(n, 8, device=device) * 2, -1)
    valid = torch.rand(n, device=device) < 0.8
    results = []
    for fn in (ops.draft_topk_kl, reference.draft_topk_kl):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, argmax, lse = fn(h, w, indices, logprobs, valid, 0.9)
        assert loss.dtype == lse.dtype == torch.float32 and not argmax.requires_grad and not lse.requires_grad
        results.append((loss, argmax, lse, *torch.autograd.grad(loss, (h, w))))
    (loss, argmax, lse, gh, gw), (ref_loss, ref_argmax, ref_lse, ref_gh, ref_gw) = results
    assert torch.equal(argmax, ref_argmax)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-6 * ref_loss.abs().item())
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)
    for got, want in ((gh, ref_gh), (gw, ref_gw)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention(device):
    q = torch.randn(2, 6, 9, 32, device=device)
    k, v = torch.randn(2, 2, 40, 32, device=device), torch.randn(2, 2, 40, 32, device=device)
    prefix_lens = torch.tensor([20, 5], device=device)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 0, 7], [-1, 0, 1, 2, 3, 4, 5, 6, 7]], device=device)
    want = ops.tree_attention(q, k, v, prefix_lens, parents)
    got = reference.tree_attention(q, k, v, prefix_lens, parents)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def random_trees(batch, nodes, vocab, device):
    """(tokens, parents, logits) of random trees over a small vocabulary (long accepted paths)."""
    parents = torch.full((batch, nodes), -1, dtype=torch.int64)
    for j in range(1, nodes):
        parents[:, j] = torch.randint(0, j, (batch,))
    tokens = torch.randint(0, vocab, (batch, nodes))
    logits = torch.randn(batch, nodes, vocab) * 2
    return tokens.to(device), parents.to(device), logits.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_verify_tree_greedy(device):
    tokens, parents, logits = random_trees(64, 16, 4, device)
    want = ops.verify_tree_greedy(tokens, parents, logits)
    for got, expected in zip(reference.verify_tree_greedy(tokens, parents, logits), want):
        assert torch.equal(got, expected)
    assert want[0].max() >= 2


@pytest.mark.parametrize("device", DEVICES)
def test_verify_tree_sampling(device):
    tokens, parents, logits = random_trees(64, 16, 4, device)
    uniforms = torch.rand(64, 16, dtype=torch.float64, device=device)
    want = ops.verify_tree_sampling_uniforms(tokens, parents, logits, 0.9, uniforms)
    for got, expected in zip(reference.verify_tree_sampling_uniforms(tokens, parents, logits, 0.9, uniforms), want):
        assert torch.equal(got, expected)
    assert want[0].max() >= 2
    # With a generator: the same draw as the op.
    got = reference.verify_tree_sampling(tokens, parents, logits, 0.9, torch.Generator().manual_seed(4))
    want = ops.verify_tree_sampling(tokens, parents, logits, 0.9, torch.Generator().manual_seed(4))
    for x, y in zip(got, want):
        assert torch.equal(x, y)
