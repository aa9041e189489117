"""draft_topk_kl (fused LM head + top-k teacher loss: kl, lk_alpha, lk_lambda) against
reference.draft_topk_kl in float64."""

import pytest
import torch
import torch.nn.functional as F

from torchspec_ext import reference
from torchspec_ext.ops import draft_topk_kl

from conftest import DEVICES, HAS_GPU


def teacher(n, k, vocab, device, absent=0.2, generator=None):
    """Random teacher top-k: ids in the draft vocabulary (about `absent` of them -1) with log-probs."""
    indices = torch.randint(0, vocab, (n, k), device=device)
    indices[torch.rand(n, k, device=device) < absent] = -1
    logprobs = torch.log_softmax(torch.randn(n, k, device=device) * 2, -1)
    return indices, logprobs


def inputs(n, h, vocab, device, dtype=torch.float32, scale=1.0):
    hidden = torch.randn(n, h, device=device) * scale
    weight = torch.randn(vocab, h, device=device) / h**0.5
    return hidden.to(dtype), weight.to(dtype)


def ours_with_grads(hidden, weight, indices, logprobs, valid=None, temperature=1.0, **loss):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    value, argmax, lse = draft_topk_kl(h, w, indices, logprobs, valid, temperature, **loss)
    gh, gw = torch.autograd.grad(value, (h, w))
    return value, argmax, lse, gh, gw


def reference_with_grads(hidden, weight, indices, logprobs, valid=None, temperature=1.0, **loss):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    value, _, _ = reference.draft_topk_kl(h, w, indices, logprobs, valid, temperature, **loss)
    gh, gw = torch.autograd.grad(value, (h, w))
    return value.detach(), gh, gw


def check(hidden, weight, indices, logprobs, valid=None, temperature=1.0, **spec):
    loss, argmax, lse, gh, gw = ours_with_grads(hidden, weight, indices, logprobs, valid, temperature, **spec)
    ref_loss, ref_gh, ref_gw = reference_with_grads(hidden, weight, indices, logprobs, valid, temperature, **spec)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    # float32 arithmetic: a few ulp of the loss's size (log Vd); gradients: relative to their largest entry.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=2e-6 * max(1.0, ref_loss.abs().item()))
    for got, want in ((gh, ref_gh), (gw, ref_gw)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale + 1e-12)
    # lse and argmax of the draft logits, from the same float64 logits.
    logits = hidden.double() @ weight.double().T / temperature
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=0, atol=1e-5)
    picked = logits.gather(1, argmax[:, None])[:, 0]
    assert (picked >= logits.amax(-1) - 1e-5).all()  # argmax, up to float32 near-ties
    return loss, gh, gw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,vocab", [(1, 8192), (7, 32000), (1000, 32768 + 3), (300, 5)])
def test_matches_float64_reference(device, n, vocab):
    hidden, weight = inputs(n, 48, vocab, device, scale=2.0)
    indices, logprobs = teacher(n, 16, vocab, device)
    check(hidden, weight, indices, logprobs)


@pytest.mark.parametrize("device", DEVICES)
def test_several_row_blocks_and_vocab_chunks(device):
    # More rows than one tile holds (2048 rows of 2048 columns on CPU, 4096 on CUDA) and a short
    # last vocabulary chunk: gradients accumulate across both kinds of tile boundary.
    hidden, weight = inputs(4500, 16, 2500, device, scale=2.0)
    indices, logprobs = teacher(4500, 8, 2500, device)
    check(hidden, weight, indices, logprobs)


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_and_mask(device):
    hidden, weight = inputs(257, 64, 9000, device, scale=3.0)
    indices, logprobs = teacher(257, 32, 9000, device, absent=0.5)
    valid = torch.rand(257, device=device) < 0.6
    check(hidden, weight, indices, logprobs, valid, temperature=0.7)
    check(hidden, weight, indices, logprobs, valid, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_k1_is_cross_entropy(device):
    hidden, weight = inputs(500, 32, 4099, device, scale=2.0)
    labels = torch.randint(0, 4099, (500,), device=device)
    indices, logprobs = labels[:, None], torch.randn(500, 1, device=device)  # one entry: p = 1 whatever its log-prob
    loss, _, _, gh, gw = ours_with_grads(hidden, weight, indices, logprobs)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ce = F.cross_entropy(h @ w.T, labels)
    ref_gh, ref_gw = torch.autograd.grad(ce, (h, w))
    torch.testing.assert_close(loss.double(), ce.detach(), rtol=0, atol=2e-6 * ce.item())
    torch.testing.assert_close(gh.double(), ref_gh, rtol=0, atol=1e-5 * ref_gh.abs().max().item())
    torch.testing.assert_close(gw.double(), ref_gw, rtol=0, atol=1e-5 * ref_gw.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_absent_rows_and_masks(device):
    hidden, weight = inputs(64, 32, 3000, device)
    indices, logprobs = teacher(64, 8, 3000, device)
    indices[::3] = -1  # rows with no entry in the draft vocabulary do not count
    valid = torch.ones(64, dtype=torch.bool, device=device)
    valid[1::4] = False
    keep = (indices >= 0).any(-1) & valid
    loss, gh, gw = check(hidden, weight, indices, logprobs, valid)
    assert (gh[~keep] == 0).all() and gh[keep].abs().amax(-1).gt(0).all()
    # NaN hidden states in rows that do not count (padding) must not reach the loss or the other
    # rows' gradients (grad_weight does get NaN, as from any matmul with those rows: 0 * NaN).
    hidden[3] = float("nan")
    hidden[5] = float("nan")
    got = ours_with_grads(hidden, weight, indices, logprobs, valid)
    torch.testing.assert_close(got[0], loss)
    torch.testing.assert_close(got[3], gh)


@pytest.mark.parametrize("device", DEVICES)
def test_no_row_counts(device):
    hidden, weight = inputs(10, 16, 700, device)
    indices, logprobs = teacher(10, 4, 700, device)
    for idx, valid in (
        (torch.full_like(indices, -1), None),
        (indices, torch.zeros(10, dtype=torch.bool, device=device)),
    ):
        loss, argmax, lse, gh, gw = ours_with_grads(hidden, weight, idx, logprobs, valid)
        assert loss.item() == 0.0 and not gh.any() and not gw.any()
        assert torch.equal(argmax, (hidden @ weight.T).argmax(-1))  # the metric still comes out


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_ties_lowest_index(device):
    weight = torch.randn(5000, 8, device=device) * 0.01
    weight[4100] = weight[17] = weight[2500] = torch.ones(8, device=device)  # across vocabulary chunks
    hidden = torch.rand(6, 8, device=device) + 1
    indices, logprobs = teacher(6, 3, 5000, device)
    _, argmax, _ = draft_topk_kl(hidden, weight, indices, logprobs)
    assert argmax.tolist() == [17] * 6
    _, argmax, _ = draft_topk_kl(torch.zeros(2, 8, device=device), weight, indices[:2], logprobs[:2])
    assert argmax.tolist() == [0, 0]
    weight[3000] = float("nan")  # a NaN logit ranks first, as in torch.argmax
    _, argmax, lse = draft_topk_kl(hidden, weight, indices, logprobs)
    assert argmax.tolist() == [3000] * 6 and lse.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(device, dtype):
    n, hsize, vocab = 512, 256, 8192
    hidden, weight = inputs(n, hsize, vocab, device, dtype=dtype, scale=2.0)
    indices, logprobs = teacher(n, 16, vocab, device)
    ref_loss, ref_gh, ref_gw = reference_with_grads(hidden, weight, indices, logprobs)
    loss, _, _, gh, gw = ours_with_grads(hidden, weight, indices, logprobs)
    # Eager in the same dtype: logits as `hidden @ weight.T` in that dtype, then a float32 log_softmax.
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager, _, _ = reference.draft_topk_kl(h, w, indices, logprobs)
    eager_gh, eager_gw = torch.autograd.grad(eager, (h, w))
    for ours_value, eager_value, want in ((loss, eager, ref_loss), (gh, eager_gh, ref_gh), (gw, eager_gw, ref_gw)):
        ours_err = (ours_value.double() - want).abs().max().item()
        eager_err = (eager_value.detach().double() - want).abs().max().item()
        assert ours_err <= eager_err, (ours_err, eager_err)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    wide = torch.randn(40, 100, device=device)
    weight = torch.randn(3000, 50, device=device) / 7
    indices, logprobs = teacher(40, 6, 3000, device)
    check(wide[:, ::2], weight, indices, logprobs)  # non-contiguous hidden
    check(wide[:, :50], weight, indices.t().contiguous().t(), logprobs)  # row stride != H, transposed ids


def test_errors():
    h, w = torch.randn(4, 16), torch.randn(100, 16)
    idx, lp = torch.randint(0, 100, (4, 3)), torch.randn(4, 3)
    cases = [
        ((h[0], w, idx, lp), "hidden must be 2-D"),
        ((h, w[0], idx, lp), "weight must be 2-D"),
        ((h, torch.randn(100, 15), idx, lp), "weight must be \\[Vd, H\\] with H"),
        ((h, w.bfloat16(), idx, lp), "same dtype"),
        ((h.double(), w.double(), idx, lp), "hidden must be float32, bfloat16 or float16"),
        ((h, w, idx.int(), lp), "teacher_indices must be int64"),
        ((h, w, idx[:3], lp[:3]), "teacher_indices must be \\[N, k\\]"),
        ((h, w, idx, lp.double()), "teacher_logprobs must be float32"),
        ((h, w, idx, lp[:, :2]), "teacher_logprobs must have the shape"),
        ((h, w, idx.clone().fill_(100), lp), "teacher_indices must be < Vd = 100"),
        ((h, w, idx.clone().fill_(-2), lp), "teacher_indices must be -1 \\(absent\\) or in"),
        ((h, torch.randn(0, 16), idx, lp), "at least one row"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            draft_topk_kl(*args)
    with pytest.raises(RuntimeError, match="valid must be bool"):
        draft_topk_kl(h, w, idx, lp, torch.ones(4))
    with pytest.raises(RuntimeError, match="valid must be \\[N\\]"):
        draft_topk_kl(h, w, idx, lp, torch.ones(5, dtype=torch.bool))
    for bad in (0.0, 2e-39):
        with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
            draft_topk_kl(h, w, idx, lp, None, bad)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    hidden, weight = inputs(9, 16, 2100, device)
    indices, logprobs = teacher(9, 4, 2100, device)
    valid = torch.rand(9, device=device) < 0.7
    op = torch.ops.torchspec.draft_topk_kl.default
    for args in (
        (hidden.requires_grad_(), weight.requires_grad_(), indices, logprobs, valid, 0.8),
        (hidden.detach(), weight.detach(), indices, logprobs, None, 1.0),
        (hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_(), indices, logprobs, None, 1.0),
    ):
        torch.library.opcheck(op, args)
    _, _, lse, draft_logprobs = op(hidden, weight, indices, logprobs, valid, 0.8)
    grad = torch.tensor(1.5, device=device)
    torch.library.opcheck(
        torch.ops.torchspec.draft_topk_kl_backward.default,
        (grad, hidden.detach(), weight.detach(), indices, logprobs, valid, lse, draft_logprobs, 0.8),
    )
    torch.library.opcheck(
        torch.ops.torchspec.draft_topk_kl_with_grad.default,
        (hidden.detach(), weight.detach(), indices, logprobs, valid, 0.8),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_gradients_equal_the_backward_op(device, dtype):
    # Eager training takes the gradients from draft_topk_kl_with_grad; torch.compile from the
    # registered backward op. Both against each other, with a non-unit upstream gradient.
    n, vocab = 3000, 4100  # several row blocks of the one-pass op (16 MiB of float32 logits each on CPU)
    hidden, weight = inputs(n, 32, vocab, device, dtype, scale=2.0)
    indices, logprobs = teacher(n, 8, vocab, device)
    valid = torch.rand(n, device=device) < 0.8
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, argmax, lse = draft_topk_kl(h, w, indices, logprobs, valid, 0.7)
    (3.0 * loss).backward()
    ref_loss, ref_argmax, ref_lse, ref_logq = torch.ops.torchspec.draft_topk_kl.default(
        hidden, weight, indices, logprobs, valid, 0.7
    )
    gh, gw = torch.ops.torchspec.draft_topk_kl_backward.default(
        torch.tensor(3.0, device=device), hidden, weight, indices, logprobs, valid, ref_lse, ref_logq, 0.7
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(argmax, ref_argmax)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    tol = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for got, want in ((h.grad, gh), (w.grad, gw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **{**tol, "atol": tol["atol"] * want.abs().max().item()})
    with torch.no_grad():  # no gradient wanted: the forward op alone
        assert torch.equal(draft_topk_kl(h, w, indices, logprobs, valid, 0.7)[1], argmax)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def step(hidden, weight, indices, logprobs, valid):
        loss, argmax, _ = draft_topk_kl(hidden * 1.0, weight, indices, logprobs, valid, 0.9)
        accuracy = (argmax == indices[:, 0]).float().mean()
        return 2.0 * loss, accuracy

    hidden, weight = inputs(33, 24, 3001, device)
    indices, logprobs = teacher(33, 5, 3001, device)
    valid = torch.rand(33, device=device) < 0.8
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, accuracy = step(h, w, indices, logprobs, valid)
    loss.backward()
    ref_loss, argmax, _, gh, gw = ours_with_grads(hidden, weight, indices, logprobs, valid, 0.9)
    torch.testing.assert_close(loss, 2.0 * ref_loss)
    torch.testing.assert_close(accuracy, (argmax == indices[:, 0]).float().mean())
    torch.testing.assert_close(h.grad, 2.0 * gh)
    torch.testing.assert_close(w.grad, 2.0 * gw)


# ---- LK losses (lk_alpha, lk_lambda) -------------------------------------------------------------

LK = [{"loss": "lk_alpha"}, {"loss": "lk_lambda"}, {"loss": "lk_lambda", "kl_scale": 0.6, "kl_decay": 2.5}]
LK_IDS = ["alpha", "lambda", "lambda-0.6-2.5"]


def lk_teacher(hidden, weight, k, absent=0.1, repeats=0.0, seed=0):
    """A teacher related to the draft (so that both sides of every min occur): a full distribution over
    the draft vocabulary plus tokens outside it (whose ids become -1), its top-k log-probabilities
    (which leave a tail), and optionally some ids repeated within a row."""
    gen = torch.Generator().manual_seed(seed)
    n, vocab = hidden.shape[0], weight.shape[0]
    draft = (hidden.double() @ weight.double().T).cpu()
    outside = max(1, int(vocab * absent))
    full = torch.cat(
        [draft + 1.5 * torch.randn(n, vocab, generator=gen), 2 * torch.randn(n, outside, generator=gen)], 1
    )
    logprobs, ids = torch.log_softmax(full, -1).topk(k, -1)
    ids = torch.where(ids < vocab, ids, -1)
    if repeats:
        j = torch.randint(1, k, (n,), generator=gen) if k > 1 else None
        rows = (torch.rand(n, generator=gen) < repeats).nonzero().squeeze(1)
        if j is not None and len(rows):
            ids[rows, j[rows]] = ids[rows, 0]  # two teacher tokens on one draft token
    return ids.to(hidden.device), logprobs.float().to(hidden.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
@pytest.mark.parametrize("n,vocab,k", [(7, 769, 1), (83, 769, 5), (83, 769, 64), (7, 3001, 64), (40, 5, 5)])
def test_lk_matches_float64_reference(device, loss, n, vocab, k):
    hidden, weight = inputs(n, 32, vocab, device, scale=2.0)
    indices, logprobs = lk_teacher(hidden, weight, k, repeats=0.3)
    indices[n // 2] = -1  # a row with no entry in the draft vocabulary: it does not count
    valid = torch.rand(n, device=device) < 0.8
    check(hidden, weight, indices, logprobs, **loss)
    check(hidden, weight, indices, logprobs, valid, 0.7, **loss)
    # The op's fourth output: the draft's log-probabilities at the teacher ids (-inf where absent).
    _, _, lse, logq = torch.ops.torchspec.draft_topk_kl.default(hidden, weight, indices, logprobs, valid, 0.7, **loss)
    want = torch.log_softmax(hidden.double() @ weight.double().T / 0.7, -1).gather(1, indices.clamp_min(0))
    want = torch.where(indices >= 0, want, float("-inf"))
    torch.testing.assert_close(logq.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
def test_lk_several_row_blocks_and_vocab_chunks(device, loss):
    # As test_several_row_blocks_and_vocab_chunks: lk_alpha's one pass computes each row block's
    # coefficients when its lse is known; lk_lambda runs the forward over every block first.
    hidden, weight = inputs(4500, 16, 2500, device, scale=2.0)
    indices, logprobs = lk_teacher(hidden, weight, 8)
    check(hidden, weight, indices, logprobs, **loss)


@pytest.mark.parametrize("device", DEVICES)
def test_lk_k1_hard_labels(device):
    # One entry with probability 1 and no tail: a = q(label), so lk_alpha is the cross-entropy and
    # lk_lambda is w * CE + (1 - w) * (1 - mean q(label)).
    hidden, weight = inputs(300, 32, 4099, device, scale=2.0)
    labels = torch.randint(0, 4099, (300,), device=device)
    indices, logprobs = labels[:, None], torch.zeros(300, 1, device=device)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logq = torch.log_softmax(h @ w.T, -1).gather(1, labels[:, None])[:, 0]
    ce, mean_q = -logq.mean(), logq.exp().mean()
    weight_kl = torch.exp(-mean_q.detach())
    for loss, want in (("lk_alpha", ce), ("lk_lambda", weight_kl * ce + (1 - weight_kl) * (1 - mean_q))):
        value, _, _, gh, gw = ours_with_grads(hidden, weight, indices, logprobs, loss=loss)
        ref_gh, ref_gw = torch.autograd.grad(want, (h, w), retain_graph=True)
        torch.testing.assert_close(value.double(), want.detach(), rtol=0, atol=2e-6 * want.item())
        torch.testing.assert_close(gh.double(), ref_gh, rtol=0, atol=1e-5 * ref_gh.abs().max().item())
        torch.testing.assert_close(gw.double(), ref_gw, rtol=0, atol=1e-5 * ref_gw.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_lk_lambda_limits(device):
    # kl_scale = 1, kl_decay = 0: w = 1, the KL loss and its gradients; kl_scale = 0: 1 - mean a.
    hidden, weight = inputs(50, 32, 1000, device, scale=2.0)
    indices, logprobs = lk_teacher(hidden, weight, 16)
    kl = ours_with_grads(hidden, weight, indices, logprobs)
    pure = ours_with_grads(hidden, weight, indices, logprobs, loss="lk_lambda", kl_scale=1.0, kl_decay=0.0)
    torch.testing.assert_close(pure[0], kl[0], rtol=1e-6, atol=0)
    for got, want in zip(pure[3:], kl[3:]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())
    value = draft_topk_kl(hidden, weight, indices, logprobs, loss="lk_lambda", kl_scale=0.0)[0]
    alpha = draft_topk_kl(hidden[:1], weight, indices[:1], logprobs[:1], loss="lk_alpha")[0]
    one_row = draft_topk_kl(hidden[:1], weight, indices[:1], logprobs[:1], loss="lk_lambda", kl_scale=0.0)[0]
    torch.testing.assert_close(1 - one_row, torch.exp(-alpha), rtol=1e-6, atol=0)  # the same a, both ways
    assert 0 < value < 1


def full_acceptance(hidden, weight, full_logprobs):
    """Mean over rows of sum_v min(p(v), q(v)) over the whole draft vocabulary, in float64."""
    q = torch.softmax(hidden.double() @ weight.double().T, -1)
    return torch.minimum(full_logprobs.double().exp(), q).sum(-1).mean().item()


@pytest.mark.parametrize("device", DEVICES)
def test_lk_top_k_acceptance_bounds_the_full_one(device):
    # With the teacher's whole distribution over the draft vocabulary, its top-k estimate a_k (what
    # the op computes: top-k terms + min(tails)) is an upper bound of the exact acceptance, and
    # a_k - min(tails) a lower bound; with k = Vd the tail is empty and a_k is exact.
    n, vocab = 64, 300
    hidden, weight = inputs(n, 16, vocab, device, scale=2.0)
    full = torch.log_softmax(hidden.double() @ weight.double().T + torch.randn(n, vocab, device=device), -1)
    exact = full_acceptance(hidden, weight, full)
    for k in (1, 8, 64, vocab):
        logprobs, indices = full.topk(k, -1)
        a_k = 1 - draft_topk_kl(hidden, weight, indices, logprobs.float(), loss="lk_lambda", kl_scale=0.0)[0].item()
        q = torch.softmax(hidden.double() @ weight.double().T, -1)
        tails = torch.minimum(1 - logprobs.exp().sum(-1), 1 - q.gather(1, indices).sum(-1)).clamp_min(0).mean().item()
        assert a_k - tails - 1e-5 <= exact <= a_k + 1e-5, (k, a_k, tails, exact)
        if k == vocab:
            assert abs(a_k - exact) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_lk_zero_acceptance_rows(device):
    # A row whose teacher mass lies outside the draft vocabulary (the present ids have probability 0,
    # no tail) has a = 0 whatever the draft: lk_alpha leaves it out of the sum (-log 0 is infinite;
    # SpecForge masks it the same way) with no gradient, and it still counts in the mean. (lk_lambda's
    # KL term is NaN on such a row, as "kl" is: its renormalised teacher is 0 / 0.)
    hidden, weight = inputs(6, 16, 500, device)
    indices, logprobs = lk_teacher(hidden, weight, 4)
    indices[2] = torch.tensor([-1, 7, 9, 11])
    logprobs[2] = torch.tensor([0.0, float("-inf"), float("-inf"), float("-inf")])
    value, gh, gw = check(hidden, weight, indices, logprobs, loss="lk_alpha")
    assert torch.isfinite(value) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert not gh[2].any()
    rest = [0, 1, 3, 4, 5]
    part = draft_topk_kl(hidden[rest], weight, indices[rest], logprobs[rest], loss="lk_alpha")[0]
    torch.testing.assert_close(value, part * 5 / 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
def test_lk_masked_rows_and_nan_padding(device, loss):
    hidden, weight = inputs(64, 32, 3000, device)
    indices, logprobs = lk_teacher(hidden, weight, 8)
    indices[::3] = -1
    valid = torch.ones(64, dtype=torch.bool, device=device)
    valid[1::4] = False
    keep = (indices >= 0).any(-1) & valid
    value, gh, gw = check(hidden, weight, indices, logprobs, valid, **loss)
    assert (gh[~keep] == 0).all() and gh[keep].abs().amax(-1).gt(0).all()
    hidden[3] = float("nan")  # rows that do not count
    hidden[5] = float("nan")
    got = ours_with_grads(hidden, weight, indices, logprobs, valid, **loss)
    torch.testing.assert_close(got[0], value)
    torch.testing.assert_close(got[3], gh)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
def test_lk_low_precision_no_worse_than_eager(device, dtype, loss):
    n, hsize, vocab = 512, 256, 8192
    hidden, weight = inputs(n, hsize, vocab, device, dtype=dtype, scale=2.0)
    indices, logprobs = lk_teacher(hidden, weight, 16)
    ref_loss, ref_gh, ref_gw = reference_with_grads(hidden, weight, indices, logprobs, **loss)
    value, _, _, gh, gw = ours_with_grads(hidden, weight, indices, logprobs, **loss)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager, _, _ = reference.draft_topk_kl(h, w, indices, logprobs, **loss)
    eager_gh, eager_gw = torch.autograd.grad(eager, (h, w))
    for ours_value, eager_value, want in ((value, eager, ref_loss), (gh, eager_gh, ref_gh), (gw, eager_gw, ref_gw)):
        ours_err = (ours_value.double() - want).abs().max().item()
        eager_err = (eager_value.detach().double() - want).abs().max().item()
        assert ours_err <= eager_err, (ours_err, eager_err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
def test_lk_one_pass_gradients_equal_the_backward_op(device, dtype, loss):
    n, vocab = 3000, 4100
    hidden, weight = inputs(n, 32, vocab, device, dtype, scale=2.0)
    indices, logprobs = lk_teacher(hidden, weight, 8, repeats=0.2)
    valid = torch.rand(n, device=device) < 0.8
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    value, argmax, lse = draft_topk_kl(h, w, indices, logprobs, valid, 0.7, **loss)
    (3.0 * value).backward()
    spec = (loss["loss"], loss.get("kl_scale", 1.0), loss.get("kl_decay", 1.0))
    ref_loss, ref_argmax, ref_lse, ref_logq = torch.ops.torchspec.draft_topk_kl.default(
        hidden, weight, indices, logprobs, valid, 0.7, *spec
    )
    gh, gw = torch.ops.torchspec.draft_topk_kl_backward.default(
        torch.tensor(3.0, device=device), hidden, weight, indices, logprobs, valid, ref_lse, ref_logq, 0.7, *spec
    )
    torch.testing.assert_close(value, ref_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(argmax, ref_argmax)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in ((h.grad, gh), (w.grad, gw)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
def test_lk_torch_compile_fullgraph(device, loss):
    @torch.compile(fullgraph=True)
    def step(hidden, weight, indices, logprobs, valid):
        value, argmax, _ = draft_topk_kl(hidden * 1.0, weight, indices, logprobs, valid, 0.9, **loss)
        return 2.0 * value, argmax

    hidden, weight = inputs(33, 24, 3001, device)
    indices, logprobs = lk_teacher(hidden, weight, 5)
    valid = torch.rand(33, device=device) < 0.8
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    value, argmax = step(h, w, indices, logprobs, valid)
    value.backward()
    ref_value, ref_argmax, _, gh, gw = ours_with_grads(hidden, weight, indices, logprobs, valid, 0.9, **loss)
    torch.testing.assert_close(value, 2.0 * ref_value)
    assert torch.equal(argmax, ref_argmax)
    torch.testing.assert_close(h.grad, 2.0 * gh)
    torch.testing.assert_close(w.grad, 2.0 * gw)


@pytest.mark.parametrize("device", DEVICES)
def test_lk_opcheck(device):
    hidden, weight = inputs(9, 16, 2100, device)
    indices, logprobs = lk_teacher(hidden, weight, 4, repeats=0.5)
    valid = torch.rand(9, device=device) < 0.7
    for spec in (("lk_alpha", 1.0, 1.0), ("lk_lambda", 1.0, 1.0), ("lk_lambda", 0.3, 4.0)):
        op = torch.ops.torchspec.draft_topk_kl.default
        for args in (
            (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), indices, logprobs, valid, 0.8, *spec),
            (
                hidden.bfloat16().requires_grad_(),
                weight.bfloat16().requires_grad_(),
                indices,
                logprobs,
                None,
                1.0,
                *spec,
            ),
        ):
            torch.library.opcheck(op, args)
        _, _, lse, logq = op(hidden, weight, indices, logprobs, valid, 0.8, *spec)
        torch.library.opcheck(
            torch.ops.torchspec.draft_topk_kl_backward.default,
            (torch.tensor(1.5, device=device), hidden, weight, indices, logprobs, valid, lse, logq, 0.8, *spec),
        )
        torch.library.opcheck(
            torch.ops.torchspec.draft_topk_kl_with_grad.default, (hidden, weight, indices, logprobs, valid, 0.8, *spec)
        )


def test_kl_is_the_default_and_unchanged():
    # loss="kl" is the default; its value and gradients do not depend on the LK arguments.
    hidden, weight = inputs(40, 16, 2100, "cpu", scale=2.0)
    indices, logprobs = teacher(40, 6, 2100, "cpu")
    base = ours_with_grads(hidden, weight, indices, logprobs)
    for loss in ({"loss": "kl"}, {"loss": "kl", "kl_scale": 0.2, "kl_decay": 3.0}):
        got = ours_with_grads(hidden, weight, indices, logprobs, **loss)
        for a, b in zip(got, base):
            assert torch.equal(a, b)


def test_lk_errors():
    h, w = torch.randn(4, 16), torch.randn(100, 16)
    idx, lp = torch.randint(0, 100, (4, 3)), torch.log_softmax(torch.randn(4, 3), -1)
    cases = [
        ({"loss": "lk-alpha"}, "loss must be 'kl', 'lk_alpha' or 'lk_lambda', got 'lk-alpha'"),
        ({"loss": "lk_lambda", "kl_decay": -1.0}, "kl_decay must be a finite number >= 0, got -1"),
        ({"loss": "lk_lambda", "kl_decay": float("inf")}, "kl_decay must be a finite number >= 0"),
        ({"loss": "lk_lambda", "kl_scale": 1.5}, "kl_scale must be in \\[0, 1\\]"),
        ({"loss": "lk_lambda", "kl_scale": float("nan")}, "kl_scale must be in \\[0, 1\\]"),
        ({"kl_scale": -0.1}, "kl_scale must be in \\[0, 1\\]"),
    ]
    for kwargs, message in cases:
        for grad in (False, True):  # the forward op, and the one-pass op
            with pytest.raises(RuntimeError, match=message):
                draft_topk_kl(h.clone().requires_grad_(grad), w, idx, lp, **kwargs)
    # Logits passed where log-probabilities are wanted: the LK losses read exp() as probabilities.
    for loss in ("lk_alpha", "lk_lambda"):
        with pytest.raises(RuntimeError, match="teacher_logprobs must be log-probabilities for loss='" + loss):
            draft_topk_kl(h, w, idx, lp + 2.0, loss=loss)
    draft_topk_kl(h, w, idx, lp + 2.0)  # the KL renormalises: any finite values will do
    valid = torch.tensor([True, False, True, True])
    bad = lp.clone()
    bad[1] += 5.0  # a row that does not count is not checked
    draft_topk_kl(h, w, idx, bad, valid, loss="lk_alpha")
    lse, logq = torch.zeros(4), torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="draft_logprobs must be float32 \\[N, k\\]"):
        torch.ops.torchspec.draft_topk_kl_backward.default(
            torch.tensor(1.0), h, w, idx, lp, None, lse, logq[:, :2], 1.0, "lk_alpha", 1.0, 1.0
        )
    with pytest.raises(RuntimeError, match="loss must be"):
        torch.ops.torchspec.draft_topk_kl_backward.default(
            torch.tensor(1.0), h, w, idx, lp, None, lse, logq, 1.0, "ce", 1.0, 1.0
        )
    with pytest.raises(ValueError, match="loss must be"):
        reference.draft_topk_kl(h, w, idx, lp, loss="lk")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
def test_cuda_teacher_inputs_are_checked_on_the_device():
    """On CUDA a teacher id outside the vocabulary, and logits passed to an LK loss, are found by a
    small kernel (no host sync): raised by raise_device_errors after a synchronisation, with the CPU
    op's words, once; a row that does not count is not checked."""
    import torchspec_ext

    h, w = torch.randn(4, 16, device="cuda"), torch.randn(100, 16, device="cuda")
    idx, lp = torch.randint(0, 100, (4, 3), device="cuda"), torch.log_softmax(torch.randn(4, 3, device="cuda"), -1)
    torchspec_ext._C.raise_device_errors(0)
    bad_idx = idx.clone()
    bad_idx[2, 1] = 100
    # The op launches kernels after its check: it may see the record itself, else raise_device_errors.
    with pytest.raises(RuntimeError, match=r"teacher_indices\[2, 1\] = 100: teacher_indices must be -1"):
        draft_topk_kl(h, w, bad_idx, lp)
        torch.cuda.synchronize()
        torchspec_ext._C.raise_device_errors(0)
    torchspec_ext._C.raise_device_errors(0)  # reported once
    bad_lp = lp.clone()
    bad_lp[3] = 0.0  # log-sum-exp log 3
    draft_topk_kl(h, w, idx, bad_lp, torch.tensor([True, True, True, False], device="cuda"), loss="lk_alpha")
    torch.cuda.synchronize()
    torchspec_ext._C.raise_device_errors(0)  # row 3 does not count
    with pytest.raises(RuntimeError, match=r"got row 3 whose log-sum-exp is 1.09"):
        draft_topk_kl(h, w, idx, bad_lp, loss="lk_lambda")
        torch.cuda.synchronize()
        torchspec_ext._C.raise_device_errors(0)


def test_lk_bad_loss_under_compile_fails_while_tracing():
    @torch.compile(fullgraph=True)
    def step(hidden, weight, indices, logprobs):
        return draft_topk_kl(hidden, weight, indices, logprobs, loss="lk_beta")[0]

    h, w = torch.randn(4, 16), torch.randn(100, 16)
    idx, lp = torch.randint(0, 100, (4, 3)), torch.log_softmax(torch.randn(4, 3), -1)
    with pytest.raises(Exception, match="loss must be 'kl', 'lk_alpha' or 'lk_lambda', got 'lk_beta'"):
        step(h, w, idx, lp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LK, ids=LK_IDS)
def test_lk_reference_in_float32_agrees(device, loss):
    # The --reference-ops baseline runs reference.draft_topk_kl on the trainer's float32 inputs.
    hidden, weight = inputs(300, 32, 4000, device, scale=2.0)
    indices, logprobs = lk_teacher(hidden, weight, 8, repeats=0.2)
    valid = torch.rand(300, device=device) < 0.8
    results = []
    for fn in (draft_topk_kl, reference.draft_topk_kl):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value, argmax, lse = fn(h, w, indices, logprobs, valid, 0.9, **loss)
        assert value.dtype == lse.dtype == torch.float32 and not argmax.requires_grad and not lse.requires_grad
        results.append((value, argmax, lse, *torch.autograd.grad(value, (h, w))))
    (value, argmax, lse, gh, gw), (ref_value, ref_argmax, ref_lse, ref_gh, ref_gw) = results
    assert torch.equal(argmax, ref_argmax)
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-5 * max(1.0, ref_value.abs().item()))
    for got, want in ((gh, ref_gh), (gw, ref_gw)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
