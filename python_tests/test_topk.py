"""topk_logprobs and linear_topk_logprobs against reference.topk_logprobs in float64 (torch sort + logsumexp)."""

import math

import pytest
import torch

from torchspec_ext import reference
from torchspec_ext.ops import linear_topk_logprobs, topk_logprobs

from conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_against_reference(logits, k, temperature=1.0):
    values, indices, lse = topk_logprobs(logits, k, temperature)
    ref_values, ref_indices, ref_lse = reference.topk_logprobs(logits.double(), k, temperature)
    assert values.dtype == torch.float32 and lse.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == ref_values.shape and lse.shape == ref_lse.shape
    assert torch.equal(indices.cpu(), ref_indices.cpu())
    # float32 arithmetic on values of size |x / T| + |lse|: a few ulp of that.
    scale = (logits.double().abs().amax() / temperature + ref_lse.abs().max()).item()
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=4e-7 * scale + 1e-6)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=8e-7 * scale + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [49152, 50257, 151936, 262144])
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_sizes_float32(device, vocab, rows):
    check_against_reference(torch.randn(rows, vocab, device=device) * 3, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 64, 1024])
@pytest.mark.parametrize("vocab", [50257, 151936])
def test_dtypes_and_k(device, dtype, k, vocab):
    # Low-precision logits repeat values often: this also checks the tie rule at scale.
    check_against_reference((torch.randn(7, vocab, device=device) * 4).to(dtype), k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows_low_precision(device, dtype):
    check_against_reference((torch.randn(1000, 49152, device=device) * 2).to(dtype), 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 2.5])
def test_temperature(device, temperature):
    check_against_reference(torch.randn(9, 50257, device=device) * 5, 32, temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(device, dtype):
    wide = (torch.randn(12, 50257 + 77, device=device) * 3).to(dtype)
    check_against_reference(wide[:, 3 : 3 + 50257], 64)  # row stride != V, unaligned start
    check_against_reference(wide[::3, :40000], 17)  # every third row
    check_against_reference(wide.t().contiguous().t()[:, :1000], 8)  # column-major: copied
    batched = (torch.randn(2, 3, 5, 4099, device=device)).to(dtype)
    check_against_reference(batched.transpose(0, 1), 100)  # [..., V] with strided batch dims


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [1, 2, 7, 31, 1024, 1025])
def test_small_vocab_and_k_equals_v(device, vocab):
    logits = torch.randn(5, vocab, device=device)
    check_against_reference(logits, min(vocab, 1024))
    check_against_reference(logits, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_lower_index_first(device, dtype):
    logits = torch.zeros(3, 5000, device=device, dtype=dtype)
    values, indices, lse = topk_logprobs(logits, 10)
    assert torch.equal(indices.cpu(), torch.arange(10).expand(3, 10))
    torch.testing.assert_close(values, torch.full_like(values, -math.log(5000)))
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(5000)))
    # Repeated values at scattered positions, the k-th boundary inside a run of equal values.
    logits = torch.randint(0, 6, (4, 20000), device=device).to(dtype)
    check_against_reference(logits, 1000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_tie(device, dtype):
    # -0 == +0, so the lower index wins whichever sign it has (short rows and long rows alike).
    for width in (4, 5000):
        logits = torch.full((1, width), -1.0, device=device, dtype=dtype)
        logits[0, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0])
        _, indices, _ = topk_logprobs(logits, 3)
        assert indices[0].tolist() == [0, 1, 2], width


@pytest.mark.parametrize("device", DEVICES)
def test_adversarial_orders(device):
    ramp = torch.linspace(-10, 10, 60000, device=device)
    check_against_reference(torch.stack([ramp, ramp.flip(0)]), 256)  # threshold rises every tile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite(device, dtype):
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(5, 3000, device=device).to(dtype)
    logits[0, 17] = nan
    logits[0, 2000] = nan
    logits[1, 5] = inf
    logits[2] = -inf
    logits[3, :1500] = -inf
    values, indices, lse = topk_logprobs(logits, 4)
    values, indices, lse = values.cpu(), indices.cpu(), lse.cpu()
    # NaN: lse and every log-probability NaN; NaNs ranked first, lower index first.
    assert math.isnan(lse[0]) and values[0].isnan().all()
    assert indices[0, :2].tolist() == [17, 2000]
    # +inf: lse = +inf, NaN where the +inf is, -inf elsewhere.
    assert lse[1] == inf and indices[1, 0] == 5
    assert math.isnan(values[1, 0]) and (values[1, 1:] == -inf).all()
    # All -inf: lse = -inf, log-probabilities NaN, the lowest indices.
    assert lse[2] == -inf and values[2].isnan().all() and indices[2].tolist() == [0, 1, 2, 3]
    # Some -inf in a finite row: they count as probability 0.
    ref_values, ref_indices, ref_lse = reference.topk_logprobs(logits[3:].double(), 4)
    torch.testing.assert_close(lse[3:].double(), ref_lse.cpu(), atol=1e-5, rtol=0)
    assert torch.equal(indices[3:], ref_indices.cpu())
    # And -inf entries picked into the top-k have log-probability -inf.
    row = torch.full((1, 100), -inf, device=device).to(dtype)
    row[0, 50] = 0
    values, indices, _ = topk_logprobs(row, 3)
    assert values[0, 0].item() == 0 and (values[0, 1:].cpu() == -inf).all()
    assert indices[0].tolist() == [50, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_ties_lower_index_first(device):
    # More NaNs than k + 64 (the reference's candidate margin): the NaNs tie, so the lowest indices
    # come first, in the op and in the reference (which once took torch.topk's arbitrary NaNs).
    logits = torch.randn(2, 3000, device=device)
    logits[0] = float("nan")
    logits[1, 100:] = float("nan")
    for k in (1, 4, 300):
        values, indices, lse = topk_logprobs(logits, k)
        ref_values, ref_indices, ref_lse = reference.topk_logprobs(logits.double(), k)
        expected = torch.stack([torch.arange(k), torch.arange(100, 100 + k)])
        assert torch.equal(indices.cpu(), expected) and torch.equal(ref_indices.cpu(), expected)
        assert values.isnan().all() and lse.isnan().all() and ref_lse.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_empty_hidden_size(device):
    # H = 0: every logit is 0 (an empty dot product), so all ties: the lowest ids, log(1 / V).
    hidden, weight = torch.randn(2, 3, 0, device=device), torch.randn(500, 0, device=device)
    values, indices, lse = linear_topk_logprobs(hidden, weight, 4)
    assert indices.shape == (2, 3, 4) and torch.equal(indices.cpu(), torch.arange(4).expand(2, 3, 4))
    torch.testing.assert_close(lse.cpu(), torch.full((2, 3), math.log(500)))
    torch.testing.assert_close(values.cpu(), torch.full((2, 3, 4), -math.log(500)))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    values, indices, lse = topk_logprobs(torch.randn(0, 3, 100, device=device), 5)
    assert values.shape == (0, 3, 5) and indices.shape == (0, 3, 5) and lse.shape == (0, 3)


def test_errors():
    x = torch.randn(4, 100)
    with pytest.raises(RuntimeError, match="logits must be float32, bfloat16 or float16"):
        topk_logprobs(x.long(), 3)
    with pytest.raises(RuntimeError, match="k must be in"):
        topk_logprobs(x, 0)
    with pytest.raises(RuntimeError, match="k must be in"):
        topk_logprobs(x, 101)
    with pytest.raises(RuntimeError, match="k must be in"):
        topk_logprobs(torch.randn(2, 5000), 1025)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-39, 1e300):  # the last two: 1 / T outside float32
        with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
            topk_logprobs(x, 3, bad)
    with pytest.raises(RuntimeError, match="at least one dimension"):
        topk_logprobs(torch.tensor(1.0), 1)
    with pytest.raises(RuntimeError, match="vocabulary .* must not be empty"):
        topk_logprobs(torch.randn(3, 0), 1)


def test_linear_errors():
    h, w = torch.randn(4, 16), torch.randn(100, 16)
    with pytest.raises(RuntimeError, match="weight must be \\[V, H\\] with H"):
        linear_topk_logprobs(h, torch.randn(100, 15), 3)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        linear_topk_logprobs(h, torch.randn(100), 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        linear_topk_logprobs(h, w.bfloat16(), 3)
    with pytest.raises(RuntimeError, match="hidden must be float32, bfloat16 or float16"):
        linear_topk_logprobs(h.double(), w.double(), 3)
    with pytest.raises(RuntimeError, match="k must be in"):
        linear_topk_logprobs(h, w, 101)
    with pytest.raises(RuntimeError, match="temperature"):
        linear_topk_logprobs(h, w, 3, 0.0)


def check_linear(hidden, weight, k, temperature=1.0):
    values, indices, lse = linear_topk_logprobs(hidden, weight, k, temperature)
    assert values.shape == (*hidden.shape[:-1], k) and lse.shape == hidden.shape[:-1]
    # The logits as the kernel saw them (rounded to the input dtype), then float64.
    logits = (hidden @ weight.T).double() / temperature
    ref_lse = torch.logsumexp(logits, -1)
    # Matmul rounding (tiles may round differently from one full matmul): about 2 ulp of the dtype.
    rounding = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[hidden.dtype]
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=rounding * ref_lse.abs().max().item() + 1e-5)
    # Each returned index holds its log-probability, and nothing outside the set is larger.
    picked = logits.gather(-1, indices) - ref_lse.unsqueeze(-1)
    tol = rounding * logits.abs().max().item() + 1e-5
    torch.testing.assert_close(values.double(), picked, rtol=0, atol=tol)
    assert (values[..., :-1] >= values[..., 1:]).all()
    kth = picked[..., -1:]
    outside = logits.scatter(-1, indices, float("-inf")) - ref_lse.unsqueeze(-1)
    assert (outside <= kth + 2 * tol).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()  # k distinct indices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 576, 49152, 64), (7, 64, 50257, 1024), (1000, 96, 50257, 64), (3, 32, 5000, 1024)]
)
def test_linear_matches_topk_of_matmul(device, dtype, shape):
    rows, hidden_size, vocab, k = shape
    hidden = torch.randn(rows, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    check_linear(hidden, weight, k)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_exact_on_float32(device):
    # With float32 tiles the result must equal topk_logprobs of the same logits exactly in its
    # indices wherever the matmul is exact: integer-valued inputs make every product exact.
    hidden = torch.randint(-3, 4, (300, 8), device=device).float()
    weight = torch.randint(-3, 4, (20011, 8), device=device).float()
    got = linear_topk_logprobs(hidden, weight, 50, 0.9)
    want = topk_logprobs(hidden @ weight.T, 50, 0.9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_batched_and_temperature(device):
    hidden = torch.randn(2, 5, 40, device=device)
    weight = torch.randn(9000, 40, device=device) / 6
    check_linear(hidden, weight, 33, temperature=0.6)


def float64_topk_loss(logits, indices, temperature, grad_values, grad_lse):
    """sum(grad_values * logprobs) + sum(grad_lse * lse) in float64, at the given indices."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, -1)
    return (grad_values * (z.gather(-1, indices) - lse.unsqueeze(-1))).sum() + (grad_lse * lse).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["both", "logprobs", "lse"])
def test_gradients(device, which):
    logits = (torch.randn(4, 3, 300, device=device) * 2).requires_grad_()
    grad_values = torch.randn(4, 3, 7, device=device, dtype=torch.float64) * (which != "lse")
    grad_lse = torch.randn(4, 3, device=device, dtype=torch.float64) * (which != "logprobs")
    values, indices, lse = topk_logprobs(logits, 7, 0.8)
    outputs = {"both": (values, lse), "logprobs": (values,), "lse": (lse,)}[which]
    grads = {"both": (grad_values, grad_lse), "logprobs": (grad_values,), "lse": (grad_lse,)}[which]
    (got,) = torch.autograd.grad(outputs, logits, [g.float() for g in grads])
    (want,) = torch.autograd.grad(float64_topk_loss(logits, indices, 0.8, grad_values, grad_lse), logits)
    assert not indices.requires_grad
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_gradients(device):
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(300, 16, device=device, requires_grad=True)
    grad_values = torch.randn(2, 5, 7, device=device, dtype=torch.float64)
    grad_lse = torch.randn(2, 5, device=device, dtype=torch.float64)
    values, indices, lse = linear_topk_logprobs(hidden, weight, 7, 0.8)
    got = torch.autograd.grad((values, lse), (hidden, weight), (grad_values.float(), grad_lse.float()))
    logits = hidden.double() @ weight.double().T
    want = torch.autograd.grad(float64_topk_loss(logits, indices, 0.8, grad_values, grad_lse), (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = torch.randn(3, 4, 700, device=device)
    torch.library.opcheck(torch.ops.torchspec.topk_logprobs.default, (logits, 16, 0.8))
    torch.library.opcheck(torch.ops.torchspec.topk_logprobs.default, (logits.bfloat16(), 1))
    hidden, weight = torch.randn(5, 32, device=device), torch.randn(5000, 32, device=device)
    torch.library.opcheck(torch.ops.torchspec.linear_topk_logprobs.default, (hidden, weight, 8, 1.0))
    # With inputs that require grad: the autograd registration is checked too.
    torch.library.opcheck(torch.ops.torchspec.topk_logprobs.default, (logits.requires_grad_(), 16, 0.8))
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(torch.ops.torchspec.linear_topk_logprobs.default, (hidden, weight, 8, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def teacher_targets(hidden, weight):
        values, indices, lse = linear_topk_logprobs(hidden, weight, 8)
        direct = topk_logprobs(hidden @ weight.T, 8)
        return values.exp().sum(-1), indices, lse, direct[0]

    hidden, weight = torch.randn(6, 32, device=device), torch.randn(3000, 32, device=device)
    mass, indices, lse, direct = teacher_targets(hidden, weight)
    values, ref_indices, ref_lse = linear_topk_logprobs(hidden, weight, 8)
    torch.testing.assert_close(mass, values.exp().sum(-1))
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(direct, values, atol=1e-5, rtol=0)
