"""tree_attention, verify_tree_greedy and verify_tree_sampling.

tree_attention is checked against reference.tree_attention in float64 (a dense boolean mask built
from the parents); the verification ops against hand-built trees with exact expected integers and
the Python walks of torchspec_ext.reference; verify_tree_sampling's losslessness by chi-square
tests on many draws.
"""

import pytest
import torch
import torch.nn.functional as F

from torchspec_ext import reference
from torchspec_ext.ops import (
    tree_attention,
    verify_tree_greedy,
    verify_tree_sampling,
    verify_tree_sampling_uniforms,
)

from conftest import DEVICES, HAS_GPU, chi_square_p_value

# ---- helpers ------------------------------------------------------------------------------------


def random_parents(batch, nodes, gen=None):
    """Random trees: parents[b, 0] = -1, parents[b, j] uniform in [0, j)."""
    parents = torch.full((batch, nodes), -1, dtype=torch.int64)
    for j in range(1, nodes):
        parents[:, j] = torch.randint(0, j, (batch,), generator=gen)
    return parents


def float64_attention(q, k, v, prefix_lens, parents, scale):
    """reference.tree_attention on the CPU in float64."""
    q, k, v = (t.cpu().double() for t in (q, k, v))
    return reference.tree_attention(q, k, v, prefix_lens.cpu(), parents.cpu(), scale)


def make_attention_inputs(batch, q_heads, kv_heads, nodes, dim, prefix_lens, seq, device, dtype=torch.float32):
    q = torch.randn(batch, q_heads, nodes, dim)
    k = torch.randn(batch, kv_heads, seq, dim)
    v = torch.randn(batch, kv_heads, seq, dim)
    to = lambda t: t.to(device=device, dtype=dtype)
    return to(q), to(k), to(v), torch.tensor(prefix_lens, dtype=torch.int64, device=device)


def one_hot_logits(batch, nodes, vocab, argmax, device, dtype=torch.float32):
    """Logits whose argmax at (b, j) is argmax[b][j] (0 elsewhere, 1 there)."""
    logits = torch.zeros(batch, nodes, vocab)
    for b in range(batch):
        for j in range(nodes):
            logits[b, j, argmax[b][j]] = 1.0
    return logits.to(device=device, dtype=dtype)


def as_lists(result):
    num, path, nxt = result
    return num.cpu().tolist(), path.cpu().tolist(), nxt.cpu().tolist()


# ---- tree_attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,nodes,dim,prefix_lens,extra",
    [
        (1, 1, 1, 1, 8, [0], 0),  # the root alone, no prefix
        (2, 4, 2, 7, 33, [5, 19], 3),  # GQA, odd T and D, prefixes differing per row, S larger than needed
        (3, 8, 1, 13, 64, [40, 0, 17], 0),  # MQA, one row without prefix
        (2, 6, 3, 31, 128, [100, 37], 11),
        (1, 32, 8, 64, 128, [300], 5),  # the benchmark's head layout
        (2, 16, 1, 9, 256, [20, 3], 1),  # the CUDA kernel's limits: 16 query heads per kv head, D = 256
        (1, 10, 2, 6, 250, [17], 0),  # D not a multiple of 16 or 32, 5 heads per group
    ],
)
def test_tree_attention_random_trees_float32(device, batch, q_heads, kv_heads, nodes, dim, prefix_lens, extra):
    seq = max(prefix_lens) + nodes + extra
    q, k, v, lens = make_attention_inputs(batch, q_heads, kv_heads, nodes, dim, prefix_lens, seq, device)
    parents = random_parents(batch, nodes)
    out = tree_attention(q, k, v, lens, parents.to(device))
    ref = float64_attention(q, k, v, lens, parents, dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_ignores_positions_after_the_tree(device):
    q, k, v, lens = make_attention_inputs(2, 2, 1, 5, 16, [4, 9], 20, device)
    parents = random_parents(2, 5).to(device)
    out = tree_attention(q, k, v, lens, parents)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 9:] = 1e4  # row 0 uses positions [0, 4 + 5)
    v2[0, :, 9:] = float("nan")
    k2[1, :, 14:] = -1e4
    v2[1, :, 14:] = float("inf")
    assert torch.equal(tree_attention(q, k2, v2, lens, parents), out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", [0, 1, 37])
def test_tree_attention_chain_is_causal_attention(device, prefix):
    nodes, dim = 9, 24
    seq = prefix + nodes
    q, k, v, lens = make_attention_inputs(2, 4, 2, nodes, dim, [prefix, prefix], seq, device)
    chain = torch.arange(-1, nodes - 1).expand(2, nodes).contiguous()
    out = tree_attention(q, k, v, lens, chain.to(device), scale=0.3)
    causal = torch.ones(nodes, seq, dtype=torch.bool).tril(diagonal=prefix)
    sdpa = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=causal.to(device), scale=0.3, enable_gqa=True
    )
    torch.testing.assert_close(out.double(), sdpa, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tree_attention_low_precision_error(device, dtype):
    """Error against float64 at most twice that of eager attention in the same dtype."""
    batch, q_heads, kv_heads, nodes, dim, prefix_lens = 3, 8, 2, 21, 64, [150, 77, 0]
    seq = max(prefix_lens) + nodes + 2
    q, k, v, lens = make_attention_inputs(batch, q_heads, kv_heads, nodes, dim, prefix_lens, seq, device, dtype)
    parents = random_parents(batch, nodes)
    out = tree_attention(q, k, v, lens, parents.to(device))
    assert out.dtype == dtype
    ref = float64_attention(q, k, v, lens, parents, dim**-0.5)
    eager = reference.tree_attention(q, k, v, lens, parents.to(device), dim**-0.5)
    ours_err = (out.cpu().double() - ref).abs().max().item()
    eager_err = (eager.cpu().double() - ref).abs().max().item()
    assert ours_err <= 2 * eager_err, (ours_err, eager_err)
    # And absolutely: one rounding of outputs below 4 in magnitude (bf16: 2^-7 relative).
    assert ours_err < (0.02 if dtype == torch.bfloat16 else 0.003)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_int32_indices_and_strided_inputs(device):
    q, k, v, lens = make_attention_inputs(2, 4, 2, 6, 16, [3, 8], 16, device)
    parents = random_parents(2, 6).to(device)
    ref = tree_attention(q, k, v, lens, parents)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    out = tree_attention(qt, k, v, lens.int(), parents.int())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", [1, 40])
def test_tree_attention_infinite_key_with_negative_score(device, prefix):
    # A key holding +inf where every query is negative scores -inf: that key weighs 0, as the dense
    # softmax gives it. The CPU kernel once made NaN of a row whose first scores were all -inf.
    q, k, v, lens = make_attention_inputs(2, 4, 2, 5, 16, [prefix, prefix], prefix + 5, device)
    q[..., 0] = -q[..., 0].abs() - 0.5
    k[:, :, 0, 0] = float("inf")  # a prefix key
    k[:, :, prefix + 1, 0] = float("inf")  # tree node 1's key
    parents = torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 2, 3]], device=device)
    out = tree_attention(q, k, v, lens, parents)
    ref = float64_attention(q, k, v, lens, parents, 16**-0.5)
    assert not ref.isnan().any()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-5)


# ---- verify_tree_greedy -------------------------------------------------------------------------

GREEDY_CASES = {
    # name: (tokens, parents, argmax per node, expected (num_accepted, path, next_token))
    "chain_all_accepted": ([5, 1, 2, 3], [-1, 0, 1, 2], [1, 2, 3, 7], (3, [0, 1, 2, 3], 7)),
    "branching": ([9, 4, 5, 6, 7, 8], [-1, 0, 0, 1, 2, 2], [5, 0, 8, 0, 0, 3], (2, [0, 2, 5, -1, -1, -1], 3)),
    "nothing_accepted": ([1, 2, 3, 4], [-1, 0, 0, 1], [6, 3, 3, 3], (0, [0, -1, -1, -1], 6)),
    "duplicate_child_tokens": ([0, 3, 3, 1, 2], [-1, 0, 0, 2, 1], [3, 2, 1, 0, 4], (2, [0, 1, 4, -1, -1], 4)),
    "root_only": ([7], [-1], [2], (0, [0], 2)),
    "stops_at_leaf": ([0, 6, 6], [-1, 0, 1], [6, 6, 6], (2, [0, 1, 2], 6)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(GREEDY_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_verify_greedy_hand_built(device, name, dtype):
    tokens, parents, argmax, (num, path, nxt) = GREEDY_CASES[name]
    logits = one_hot_logits(1, len(tokens), 10, [argmax], device, dtype)
    result = verify_tree_greedy(torch.tensor([tokens], device=device), torch.tensor([parents], device=device), logits)
    assert as_lists(result) == ([num], [path], [nxt])


@pytest.mark.parametrize("device", DEVICES)
def test_verify_greedy_ties_take_the_lowest_id(device):
    # Node 0's logits tie at ids 2 and 4: the argmax is 2, so child 2 (token 2) is accepted, not
    # child 1 (token 4); at node 2, ties at 0, 1 and 3 give 0, which no child holds.
    tokens = torch.tensor([[5, 4, 2, 1]], device=device)
    parents = torch.tensor([[-1, 0, 0, 2]], device=device)
    logits = torch.zeros(1, 4, 6)
    logits[0, 0, [2, 4]] = 3.0
    logits[0, 2, [0, 1, 3]] = 2.0
    result = verify_tree_greedy(tokens, parents, logits.to(device))
    assert as_lists(result) == ([1], [[0, 2, -1, -1]], [0])


@pytest.mark.parametrize("device", DEVICES)
def test_verify_greedy_batch_of_different_trees(device):
    names = sorted(GREEDY_CASES)[:4]
    nodes = 6
    tokens, parents, argmaxes, expected = [], [], [], ([], [], [])
    for name in names:
        tok, par, am, (num, path, nxt) = GREEDY_CASES[name]
        pad = nodes - len(tok)  # padding nodes hang off the root with a token never chosen
        tokens.append(tok + [9] * pad)
        parents.append(par + [0] * pad)
        argmaxes.append(am + [0] * pad)
        expected[0].append(num)
        expected[1].append(path + [-1] * pad)
        expected[2].append(nxt)
    logits = one_hot_logits(len(names), nodes, 10, argmaxes, device)
    result = verify_tree_greedy(torch.tensor(tokens, device=device), torch.tensor(parents, device=device), logits)
    assert as_lists(result) == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_greedy_random_against_python_walk(device, dtype):
    batch, nodes, vocab = 64, 24, 5
    gen = torch.Generator().manual_seed(1)
    parents = random_parents(batch, nodes, gen)
    tokens = torch.randint(0, vocab, (batch, nodes), generator=gen)
    # Small integer logits: many ties, and long accepted paths over a vocabulary of 5.
    logits = torch.randint(-2, 3, (batch, nodes, vocab), generator=gen).to(dtype)
    result = verify_tree_greedy(tokens.to(device), parents.to(device), logits.to(device))
    expected = reference.verify_tree_greedy(tokens, parents, logits)  # torch.argmax takes the first maximum
    assert as_lists(result) == as_lists(expected)
    assert max(result[0].tolist()) >= 3  # the test exercises long paths


@pytest.mark.parametrize("device", DEVICES)
def test_verify_greedy_large_vocab_nan(device):
    vocab = 152064
    logits = torch.randn(2, 3, vocab, device=device)
    logits[0, 0, 100_000] = 50.0
    logits[1, 0, 77] = float("nan")  # NaN is the argmax, as for torch.argmax
    tokens = torch.tensor([[0, 100_000, 5], [0, 3, 77]], device=device)
    parents = torch.tensor([[-1, 0, 0], [-1, 0, 0]], device=device)
    num, path, nxt = verify_tree_greedy(tokens, parents, logits)
    assert num.tolist() == [1, 1] and path.tolist() == [[0, 1, -1], [0, 2, -1]]
    assert nxt.tolist() == [logits[0, 1].argmax().item(), logits[1, 2].argmax().item()]


# ---- verify_tree_sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_verify_sampling_against_python_walk(device, temperature):
    batch, nodes, vocab = 200, 12, 6
    gen = torch.Generator().manual_seed(2)
    parents = random_parents(batch, nodes, gen)
    tokens = torch.randint(0, vocab, (batch, nodes), generator=gen)
    logits = torch.randn(batch, nodes, vocab, generator=gen) * 2
    uniforms = torch.rand(batch, nodes, dtype=torch.float64, generator=gen)
    result = verify_tree_sampling_uniforms(
        tokens.to(device), parents.to(device), logits.to(device), temperature, uniforms.to(device)
    )
    expected = reference.verify_tree_sampling_uniforms(tokens, parents, logits.double(), temperature, uniforms)
    assert as_lists(result) == as_lists(expected)
    assert max(result[0].tolist()) >= 2


@pytest.mark.parametrize("device", DEVICES)
def test_verify_sampling_point_masses_are_deterministic(device):
    # Target logits -inf except one token per node: the walk is the greedy one whatever the draws.
    tokens, parents, argmax, (num, path, nxt) = GREEDY_CASES["branching"]
    logits = torch.full((1, len(tokens), 10), float("-inf"))
    for j, t in enumerate(argmax):
        logits[0, j, t] = 0.0
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        result = verify_tree_sampling(
            torch.tensor([tokens], device=device), torch.tensor([parents], device=device), logits.to(device), 0.7, gen
        )
        assert as_lists(result) == ([num], [path], [nxt])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("u", [0.0, 1 - 2**-53])
def test_verify_sampling_never_takes_a_zero_probability_token(device, u):
    # Tokens at logit -1e4 have probability exactly 0 (exp underflows): never accepted (u = 0 accepts
    # any token of positive probability) nor drawn (u near 1 ends the inversion at the last token
    # of positive probability). The CPU kernel once floored their probability at 2^-125 / sum.
    batch, vocab = 4, 300
    logits = torch.randn(batch, 3, vocab, generator=torch.Generator().manual_seed(4)) * 2
    logits[..., vocab // 2 :] = -1e4
    tokens = torch.tensor([[0, vocab - 1, vocab // 2]] * batch)  # both children have probability 0
    parents = torch.tensor([[-1, 0, 0]] * batch)
    uniforms = torch.full((batch, 3), u, dtype=torch.float64)
    result = verify_tree_sampling_uniforms(
        tokens.to(device), parents.to(device), logits.to(device), 1.0, uniforms.to(device)
    )
    num, _, nxt = as_lists(result)
    assert num == [0] * batch
    assert all(t < vocab // 2 for t in nxt), nxt
    expected = reference.verify_tree_sampling_uniforms(tokens, parents, logits.double(), 1.0, uniforms)
    assert as_lists(result) == as_lists(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_verify_sampling_generator_reproducible(device):
    tokens = torch.randint(0, 50, (8, 10), device=device)
    parents = random_parents(8, 10).to(device)
    logits = torch.randn(8, 10, 50, device=device)
    a = verify_tree_sampling(tokens, parents, logits, 1.0, torch.Generator().manual_seed(3))
    b = verify_tree_sampling(tokens, parents, logits, 1.0, torch.Generator().manual_seed(3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# The losslessness tree, vocabulary of 8: root children tokens 2, 5, 2 (a duplicate), 7; node 1
# (token 2) has children tokens 1, 6, 1; node 4 (token 1) has a child token 3.
LOSSLESS_TOKENS = [0, 2, 5, 2, 1, 6, 1, 7, 3]
LOSSLESS_PARENTS = [-1, 0, 0, 0, 1, 1, 1, 0, 4]
LOSSLESS_DRAWS = 120_000
LOSSLESS_TEMPERATURE = 0.8


def lossless_logits():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(len(LOSSLESS_TOKENS), 8, generator=gen) * 1.2
    # At the root and at node 1 the draft tokens are likely but far from certain (so that both
    # the first child's rejection and the residual's renormalisation matter): these probabilities.
    root = torch.tensor([0.04, 0.10, 0.30, 0.06, 0.10, 0.20, 0.05, 0.15])
    node1 = torch.tensor([0.05, 0.30, 0.10, 0.05, 0.10, 0.05, 0.25, 0.10])
    logits[0] = root.log() * LOSSLESS_TEMPERATURE
    logits[1] = node1.log() * LOSSLESS_TEMPERATURE
    return logits


def reference_walks(uniforms):
    """reference.verify_tree_sampling_uniforms on the losslessness tree in float64, a row per row of uniforms."""
    n = uniforms.shape[0]
    tokens = torch.tensor(LOSSLESS_TOKENS).expand(n, -1)
    parents = torch.tensor(LOSSLESS_PARENTS).expand(n, -1)
    logits = lossless_logits().double().expand(n, -1, -1)
    return reference.verify_tree_sampling_uniforms(tokens, parents, logits, LOSSLESS_TEMPERATURE, uniforms)


def first_two_tokens(tokens, num, path, nxt):
    """The first emitted token of every draw, and the second one where node 1 was accepted first."""
    tok = torch.as_tensor(tokens)
    emitted_first = torch.where(num >= 1, tok[path[:, 1].clamp(min=0)], nxt)
    after_node1 = path[:, 1] == 1
    emitted_second = torch.where(num >= 2, tok[path[:, 2].clamp(min=0)], nxt)[after_node1]
    return emitted_first, emitted_second


def lossless_p_values(num, path, nxt, probs):
    first, second = first_two_tokens(LOSSLESS_TOKENS, num.cpu(), path.cpu(), nxt.cpu())
    assert second.numel() > 10_000
    return (
        chi_square_p_value(torch.bincount(first, minlength=8), probs[0]),
        chi_square_p_value(torch.bincount(second, minlength=8), probs[1]),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_verify_sampling_is_lossless(device):
    """The first emitted token is distributed as softmax(logits[root] / T), the second (given node 1
    accepted first) as softmax(logits[1] / T): chi-square, 120k draws, fixed seed."""
    logits = lossless_logits()
    probs = torch.softmax(logits.double() / LOSSLESS_TEMPERATURE, -1)
    n = LOSSLESS_DRAWS
    tokens = torch.tensor(LOSSLESS_TOKENS).expand(n, -1).to(device)
    parents = torch.tensor(LOSSLESS_PARENTS).expand(n, -1).to(device)
    batch_logits = logits.expand(n, -1, -1).to(device)
    gen = torch.Generator().manual_seed(12345)
    num, path, nxt = verify_tree_sampling(tokens, parents, batch_logits, LOSSLESS_TEMPERATURE, gen)
    p_first, p_second = lossless_p_values(num, path, nxt, probs)
    assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)


@pytest.mark.parametrize("variant", ["no_renormalisation", "accept_all"])
def test_lossless_test_rejects_wrong_samplers(variant, monkeypatch):
    """The chi-square check above has power: the same draws through the reference walk with a
    deliberately wrong acceptance rule (without renormalising the residual, or accepting every
    first child) fail it."""
    wrong_rules = {"no_renormalisation": lambda u, residual, p: u < p, "accept_all": lambda u, residual, p: True}
    monkeypatch.setattr(reference, "_accepts", wrong_rules[variant])
    probs = torch.softmax(lossless_logits().double() / LOSSLESS_TEMPERATURE, -1)
    n = LOSSLESS_DRAWS
    uniforms = torch.rand(n, len(LOSSLESS_TOKENS), dtype=torch.float64, generator=torch.Generator().manual_seed(12345))
    num, path, nxt = reference_walks(uniforms)
    assert max(lossless_p_values(num, path, nxt, probs)) < 1e-6


def test_lossless_python_walk_passes():
    """The reference's Python walk with the op's rules passes the same check (the reference is sound)."""
    probs = torch.softmax(lossless_logits().double() / LOSSLESS_TEMPERATURE, -1)
    uniforms = torch.rand(
        LOSSLESS_DRAWS, len(LOSSLESS_TOKENS), dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    num, path, nxt = reference_walks(uniforms)
    assert min(lossless_p_values(num, path, nxt, probs)) > 1e-3


# ---- opcheck, compile and errors ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, lens = make_attention_inputs(2, 4, 2, 5, 16, [3, 6], 12, device)
    parents = random_parents(2, 5).to(device)
    torch.library.opcheck(torch.ops.torchspec.tree_attention.default, (q, k, v, lens, parents, None))
    torch.library.opcheck(
        torch.ops.torchspec.tree_attention.default, (q.bfloat16(), k.bfloat16(), v.bfloat16(), lens, parents, 0.2)
    )
    tokens = torch.randint(0, 9, (2, 5), device=device)
    logits = torch.randn(2, 5, 9, device=device)
    torch.library.opcheck(torch.ops.torchspec.verify_tree_greedy.default, (tokens, parents, logits))
    uniforms = torch.rand(2, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.torchspec.verify_tree_sampling.default, (tokens, parents, logits, 0.9, uniforms))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    q, k, v, lens = make_attention_inputs(2, 4, 2, 5, 16, [3, 6], 12, device)
    parents = random_parents(2, 5).to(device)
    tokens = torch.randint(0, 9, (2, 5), device=device)
    logits = torch.randn(2, 5, 9, device=device)

    def f(q, k, v, lens, parents, tokens, logits):
        return tree_attention(q, k, v, lens, parents) * 2, verify_tree_greedy(tokens, parents, logits)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, verdict = compiled(q, k, v, lens, parents, tokens, logits)
    ref_out, ref_verdict = f(q, k, v, lens, parents, tokens, logits)
    assert torch.equal(out, ref_out)
    for x, y in zip(verdict, ref_verdict):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_sampling_with_global_rng(device):
    """Under torch.compile(fullgraph=True) verify_tree_sampling is called without a generator
    (dynamo does not take a torch.Generator argument); it then draws from the global RNG."""
    tokens = torch.randint(0, 9, (4, 6), device=device)
    parents = random_parents(4, 6).to(device)
    logits = torch.randn(4, 6, 9, device=device)
    f = lambda a, b, c: verify_tree_sampling(a, b, c, 0.8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = compiled(tokens, parents, logits)
    torch.manual_seed(5)
    want = f(tokens, parents, logits)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_tree_attention_cuda_limits():
    q, k, v, lens = make_attention_inputs(1, 2, 1, 3, 264, [4], 8, "cuda")
    parents = torch.tensor([[-1, 0, 0]], device="cuda")
    with pytest.raises(RuntimeError, match=r"head dimensions D <= 256, got 264"):
        tree_attention(q, k, v, lens, parents)
    q, k, v, lens = make_attention_inputs(1, 17, 1, 3, 16, [4], 8, "cuda")
    with pytest.raises(RuntimeError, match=r"up to 16 query heads per kv head, got 17"):
        tree_attention(q, k, v, lens, parents)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_verify_cuda_rejects_trees_past_shared_memory():
    # The CUDA kernel keeps 8 bytes per node in shared memory: 40000 nodes are past any GPU's limit.
    # The check comes before the launch, and the next launch works.
    nodes = 40000
    tokens = torch.ones(1, nodes, dtype=torch.int64, device="cuda")
    parents = (torch.arange(nodes, device="cuda") - 1).unsqueeze(0)
    logits = torch.zeros(1, nodes, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"T = 40000 tree nodes need \d+ bytes of shared memory per block on CUDA"):
        verify_tree_greedy(tokens, parents, logits)
    num, path, nxt = verify_tree_greedy(tokens[:, :6000], parents[:, :6000], logits[:, :6000])
    assert num.item() == 0 and nxt.item() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_cuda_inputs_are_checked_on_the_device():
    """On CUDA the trees, prefix lengths, tokens and uniforms are checked by the kernels (no host copy):
    the call raises nothing, the bad row's outputs are NaN / -1, and after a synchronisation the error
    is raised, with the CPU op's words, by raise_device_errors or the next call on the device."""
    import torchspec_ext

    q, k, v, lens, parents = _attn_args("cuda")
    parents[1, 2] = 2
    out = tree_attention(q, k, v, lens, parents)
    torch.cuda.synchronize()
    assert out[1].isnan().all() and not out[0].isnan().any()
    with pytest.raises(RuntimeError, match=r"parents\[1, 2\] = 2: a node's parent must be an earlier node"):
        torchspec_ext._C.raise_device_errors(0)
    torchspec_ext._C.raise_device_errors(0)  # reported once
    tokens, vparents, logits = (t.cuda() for t in _verify_args())
    tokens[0, 3] = 10
    num, path, nxt = verify_tree_greedy(tokens, vparents, logits)
    torch.cuda.synchronize()
    assert num[0].item() == -1 and nxt[0].item() == -1 and (path[0] == -1).all() and num[1].item() >= 0
    with pytest.raises(RuntimeError, match=r"tokens\[0, 3\] = 10 is not a token id in \[0, V = 10\)"):
        tree_attention(q, k, v, lens, parents.clamp(max=1))  # the next call raises it


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_cuda_graph_captures_the_tree_ops():
    """No host synchronisation in the tree ops on CUDA: a CUDA graph captures them, and replays
    give the eager results for new inputs copied into the captured ones."""
    q, k, v, lens, parents = _attn_args("cuda")
    tokens, vparents, logits = (t.cuda() for t in _verify_args())
    run = lambda: (tree_attention(q, k, v, lens, parents), *verify_tree_greedy(tokens, vparents, logits))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for seed in range(3):
        torch.manual_seed(seed)
        q.copy_(torch.randn_like(q))
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, run()):
            assert torch.equal(got, want)


def _attn_args(device="cpu"):
    q, k, v, lens = make_attention_inputs(2, 4, 2, 5, 16, [3, 6], 12, device)
    return q, k, v, lens, torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 2, 3]], device=device)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a[4].__setitem__((1, 0), 0), r"parents\[1, 0\] must be -1"),
        (lambda a: a[4].__setitem__((0, 3), -1), r"parents\[0, 3\] = -1: a second root"),
        (lambda a: a[4].__setitem__((1, 2), 2), r"parents\[1, 2\] = 2: a node's parent must be an earlier node"),
        (lambda a: a[4].__setitem__((1, 4), 7), r"parents\[1, 4\] = 7"),
        (lambda a: a.__setitem__(4, a[4][:, :4]), r"parents has T = 4 nodes but q \(dim 2\) has 5 \(T mismatch\)"),
        (lambda a: a.__setitem__(3, torch.tensor([3, 8])), r"prefix_lens\[1\] = 8: need .* prefix_lens\[b\] \+ T <= S"),
        (lambda a: a.__setitem__(3, torch.tensor([-1, 0])), r"prefix_lens\[0\] = -1"),
        (lambda a: a.__setitem__(3, torch.tensor([1, 2, 3])), r"prefix_lens must be \[B\]"),
        (lambda a: a.__setitem__(1, a[1][:, :1].expand(-1, 3, -1, -1)), r"v must have k's shape"),
        (
            lambda a: (
                a.__setitem__(1, a[1][:, :1].expand(-1, 3, -1, -1)),
                a.__setitem__(2, a[2][:, :1].expand(-1, 3, -1, -1)),
            ),
            r"query heads \(4\) must be a multiple of the kv heads \(3\)",
        ),
        (lambda a: a.__setitem__(0, a[0][..., :8]), r"k must be \[B, Hkv, S, D\] with B = 2 and D = 8"),
        (lambda a: a.__setitem__(0, a[0].double()), r"q must be float32, bfloat16 or float16"),
        (lambda a: a.__setitem__(1, a[1].half()), r"q, k and v must have the same dtype"),
        (lambda a: a.__setitem__(4, a[4].float()), r"parents must be int64"),
        (lambda a: a.__setitem__(0, a[0][0]), r"q must be 4-D"),
    ],
)
def test_tree_attention_errors(mutate, match):
    args = list(_attn_args())
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        tree_attention(*args)


def _verify_args():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 1]])
    return [tokens, parents, torch.randn(2, 4, 10)]


@pytest.mark.parametrize("sampling", [False, True])
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a[1].__setitem__((0, 2), -1), r"parents\[0, 2\] = -1: a second root"),
        (lambda a: a[1].__setitem__((1, 3), 3), r"parents\[1, 3\] = 3: a node's parent must be an earlier node"),
        (lambda a: a[1].__setitem__((0, 0), 1), r"parents\[0, 0\] must be -1"),
        (lambda a: a.__setitem__(1, a[1][:, :3]), r"parents has T = 3 nodes but tokens has 4 \(T mismatch\)"),
        (lambda a: a.__setitem__(2, a[2][:, :3]), r"target_logits has T = 3 nodes but tokens has 4 \(T mismatch\)"),
        (lambda a: a.__setitem__(2, a[2][:1]), r"target_logits must be \[B, T, V\] with B = 2"),
        (lambda a: a[0].__setitem__((1, 2), 10), r"tokens\[1, 2\] = 10 is not a token id in \[0, V = 10\)"),
        (lambda a: a[0].__setitem__((0, 1), -3), r"tokens\[0, 1\] = -3"),
        (lambda a: a.__setitem__(2, a[2][0]), r"target_logits must be 3-D"),
        (lambda a: a.__setitem__(0, a[0][0]), r"tokens must be 2-D"),
        (lambda a: a.__setitem__(2, a[2].double()), r"target_logits must be float32, bfloat16 or float16"),
    ],
)
def test_verify_errors(sampling, mutate, match):
    args = _verify_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        if sampling:
            verify_tree_sampling_uniforms(*args, 1.0, torch.rand(2, 4, dtype=torch.float64))
        else:
            verify_tree_greedy(*args)


def test_verify_sampling_argument_errors():
    args = _verify_args()
    for bad in (0.0, 1e-39):
        with pytest.raises(RuntimeError, match=r"temperature must be a finite number > 0 .*\(use verify_tree_greedy"):
            verify_tree_sampling(*args, bad)
    with pytest.raises(RuntimeError, match=r"uniforms must be \[B, T\] = \[2, 4\]"):
        verify_tree_sampling_uniforms(*args, 1.0, torch.rand(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"uniforms must be float64"):
        verify_tree_sampling_uniforms(*args, 1.0, torch.rand(2, 4))
    with pytest.raises(RuntimeError, match=r"uniforms\[1, 2\] = 1 is not in \[0, 1\)"):
        u = torch.rand(2, 4, dtype=torch.float64)
        u[1, 2] = 1.0
        verify_tree_sampling_uniforms(*args, 1.0, u)
