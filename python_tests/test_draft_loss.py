"""draft_topk_kl (fused LM head + top-k teacher loss) against reference.draft_topk_kl in float64."""

import pytest
import torch
import torch.nn.functional as F

from torchspec_ext import reference
from torchspec_ext.ops import draft_topk_kl

from conftest import DEVICES


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


def ours_with_grads(hidden, weight, indices, logprobs, valid=None, temperature=1.0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, argmax, lse = draft_topk_kl(h, w, indices, logprobs, valid, temperature)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss, argmax, lse, gh, gw


def reference_with_grads(hidden, weight, indices, logprobs, valid=None, temperature=1.0):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss, _, _ = reference.draft_topk_kl(h, w, indices, logprobs, valid, temperature)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def check(hidden, weight, indices, logprobs, valid=None, temperature=1.0):
    loss, argmax, lse, gh, gw = ours_with_grads(hidden, weight, indices, logprobs, valid, temperature)
    ref_loss, ref_gh, ref_gw = reference_with_grads(hidden, weight, indices, logprobs, valid, temperature)
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
    _, _, lse = op(hidden, weight, indices, logprobs, valid, 0.8)
    grad = torch.tensor(1.5, device=device)
    torch.library.opcheck(
        torch.ops.torchspec.draft_topk_kl_backward.default,
        (grad, hidden.detach(), weight.detach(), indices, logprobs, valid, lse, 0.8),
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
    ref_loss, ref_argmax, ref_lse = torch.ops.torchspec.draft_topk_kl.default(
        hidden, weight, indices, logprobs, valid, 0.7
    )
    gh, gw = torch.ops.torchspec.draft_topk_kl_backward.default(
        torch.tensor(3.0, device=device), hidden, weight, indices, logprobs, valid, ref_lse, 0.7
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
