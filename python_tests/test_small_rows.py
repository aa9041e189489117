import copy
import json

import pytest
import torch

from torchspec_ext import small_rows
from torchspec_ext.ops import small_rows_linear
from torchspec_ext.small_rows import SmallRowsLinear, enable_small_rows

WAYS = ("usual", "swapped", "kernel")


@pytest.fixture
def forced(monkeypatch):
    """Sets which way every (shape, dtype, rows) takes, instead of timing them."""
    table = {}
    monkeypatch.setattr(small_rows, "_fastest", table)

    def force(linear, way: str):
        for rows in small_rows.MEASURED_ROWS:
            for copy_allowed in (False, True):
                table[(*linear.weight.shape, linear.weight.dtype, copy_allowed, rows)] = way

    return force


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 48), (1, 5, 48), (2, 4, 48), (9, 48), (0, 48)])
def test_small_rows_linear_matches_float64(forced, way, bias, shape):
    torch.manual_seed(len(shape) * 10 + shape[0])
    linear = torch.nn.Linear(48, 33, bias=bias).requires_grad_(False)
    forced(linear, way)
    x = torch.randn(shape)
    b = None if linear.bias is None else linear.bias.double()
    want = torch.nn.functional.linear(x.double(), linear.weight.double(), b)
    enable_small_rows(linear)
    assert type(linear) is SmallRowsLinear
    got = linear(x)
    assert got.shape == (*shape[:-1], 33) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_each_way_is_taken_only_where_it_won(forced, monkeypatch):
    linear = torch.nn.Linear(16, 8, bias=False).requires_grad_(False)
    enable_small_rows(linear)
    calls = []
    real = small_rows._apply

    def recorded(way, x, *args):
        calls.append((way, x.shape[0]))
        return real(way, x, *args)

    monkeypatch.setattr(small_rows, "_apply", recorded)
    for way in ("swapped", "kernel"):
        forced(linear, way)
        linear(torch.randn(3, 16))
        linear(torch.randn(20, 16))  # between two measured counts: the next one's way
        linear(torch.randn(33, 16))  # beyond the measured counts: the usual way
    forced(linear, "usual")
    linear(torch.randn(3, 16))
    assert calls == [("swapped", 3), ("swapped", 20), ("kernel", 3), ("kernel", 20)]
    calls.clear()
    forced(linear, "swapped")
    small_rows._fastest[8, 16, torch.float32, False, 24] = "kernel"
    linear(torch.randn(16, 16))
    linear(torch.randn(17, 16))  # 17 to 24 rows take the way measured at 24
    assert calls == [("swapped", 16), ("kernel", 17)]


def test_what_autograd_tracks_takes_the_usual_way(forced):
    linear = torch.nn.Linear(16, 8).requires_grad_(False)
    enable_small_rows(linear)
    forced(linear, "kernel")  # the kernel has no gradient
    x = torch.randn(2, 16, requires_grad=True)
    linear(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(2, -1))


def test_the_first_use_measures_and_remembers(monkeypatch):
    table = {}
    monkeypatch.setattr(small_rows, "_fastest", table)
    monkeypatch.setattr(small_rows, "OUT_OF_CACHE_BYTES", 1 << 16)
    monkeypatch.setattr(small_rows, "MEASURED_FROM_BYTES", 1 << 12)
    linear, tiny = torch.nn.Linear(64, 32).requires_grad_(False), torch.nn.Linear(8, 8).requires_grad_(False)
    enable_small_rows(torch.nn.Sequential(linear, tiny))
    linear(torch.randn(2, 64))
    assert sorted(table) == [(32, 64, torch.float32, False, r) for r in small_rows.MEASURED_ROWS]
    assert set(table.values()) <= set(WAYS)
    tiny(torch.randn(2, 8))  # too small to be worth measuring: the usual way
    assert all(table[8, 8, torch.float32, False, r] == "usual" for r in small_rows.MEASURED_ROWS)


# The kernel itself, against float64: row counts across its groups of four, input widths with and
# without a tail past its 16-element steps, weight blocks cut mid-way, bias or none, both dtypes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 8, 9, 13])
@pytest.mark.parametrize("in_features, out_features", [(576, 70), (37, 33), (16, 1), (5, 200), (1, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_matches_float64(dtype, rows, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    got = small_rows_linear(x, weight, b)
    want = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.shape == (rows, out_features) and got.dtype == dtype
    # float32 sums; a bfloat16 result is that sum rounded to 8 bits of mantissa.
    rtol, atol = (1e-5, 1e-5 * in_features**0.5) if dtype == torch.float32 else (2**-8, 1e-5 * in_features**0.5)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_the_kernel_reads_a_bfloat16_weight_for_float32_rows():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 100), torch.randn(70, 100).bfloat16(), torch.randn(70)
    got = small_rows_linear(x, weight, bias)
    assert got.dtype == torch.float32
    want = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_a_draft_may_read_a_bfloat16_copy_made_again_when_the_weight_changes(forced):
    torch.manual_seed(0)
    draft, target = torch.nn.Linear(64, 40), torch.nn.Linear(64, 40)
    for m in (draft, target):
        m.requires_grad_(False)
    enable_small_rows(draft, bfloat16_copy=True)
    enable_small_rows(target)
    assert draft.bfloat16_copy and not target.bfloat16_copy
    forced(draft, "bfloat16 kernel")
    x = torch.randn(3, 64)
    want = lambda m: x.double() @ m.weight.bfloat16().double().T + m.bias.double()
    torch.testing.assert_close(draft(x).double(), want(draft), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        draft.weight.mul_(2)  # an optimiser's in-place update
    torch.testing.assert_close(draft(x).double(), want(draft), rtol=1e-5, atol=1e-5)
    draft.load_state_dict({"weight": torch.randn(40, 64), "bias": torch.zeros(40)})
    torch.testing.assert_close(draft(x).double(), want(draft), rtol=1e-5, atol=1e-5)


def test_only_a_draft_measures_the_bfloat16_copy(monkeypatch):
    monkeypatch.setattr(small_rows, "_fastest", {})
    monkeypatch.setattr(small_rows, "OUT_OF_CACHE_BYTES", 1 << 16)
    monkeypatch.setattr(small_rows, "MEASURED_FROM_BYTES", 1 << 12)
    measured = []
    real = small_rows._apply
    monkeypatch.setattr(small_rows, "_apply", lambda way, *args: measured.append(way) or real(way, *args))
    with torch.no_grad():
        for copy_allowed in (False, True):
            linear = torch.nn.Linear(64, 32).requires_grad_(False)
            enable_small_rows(linear, bfloat16_copy=copy_allowed)
            measured.clear()
            linear(torch.randn(2, 64))
            assert ("bfloat16 kernel" in measured) == copy_allowed


def test_the_kernel_reads_strided_rows_and_batch_shapes():
    torch.manual_seed(0)
    wide = torch.randn(40, 100)
    weight = wide[:, 10:74]  # rows 100 elements apart
    x = torch.randn(2, 3, 64)  # [..., in]
    x_strided = torch.randn(3, 2, 64).transpose(0, 1)
    for inputs in (x, x_strided):
        got = small_rows_linear(inputs, weight)
        torch.testing.assert_close(got.double(), inputs.double() @ weight.double().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(2, 8), torch.randn(4, 9)), "x's last dimension \\(8\\) must be weight's in \\(9\\)"),
        ((torch.randn(2, 8), torch.randn(4, 8, 1)), "weight must be 2-D"),
        ((torch.randn(2, 8).half(), torch.randn(4, 8).half()), "x must be float32 or bfloat16, got Half"),
        ((torch.randn(2, 8).bfloat16(), torch.randn(4, 8)), "weight must have x's dtype"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "bias must be \\[out\\] = \\[4\\]"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(4).double()), "bias must have x's dtype"),
    ],
)
def test_the_kernel_names_a_bad_argument(args, message):
    with pytest.raises(RuntimeError, match="torchspec.small_rows_linear: " + message):
        small_rows_linear(*args)


def test_a_model_keeps_its_weights_copies_and_trains_the_usual_way(forced):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = copy.deepcopy(model.state_dict())
    enable_small_rows(model)
    enable_small_rows(model)  # idempotent
    assert [type(m) for m in model] == [SmallRowsLinear, torch.nn.ReLU, SmallRowsLinear]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert type(copy.deepcopy(model)[0]) is SmallRowsLinear
    for m in (model[0], model[2]):
        forced(m, "kernel")
    x = torch.randn(2, 8)
    model(x).sum().backward()  # gradients on: the usual way, autograd as nn.Linear's
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference.load_state_dict(before)
    reference(x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)


def test_a_loaded_draft_decodes_on_the_small_rows_path(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchspec_ext import drafts
    from torchspec_ext.drafts.eagle3 import DraftConfig, Eagle3Draft

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    target = LlamaForCausalLM(config).eval()
    draft = Eagle3Draft(DraftConfig.from_target(config, 100))
    draft.set_vocab(torch.randperm(300)[:100])
    draft.init_from_target(target)
    draft.save(tmp_path)
    _, loaded = drafts.load_draft(tmp_path, target)
    linears = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is SmallRowsLinear for m in linears)


def test_the_benchmark_reports_the_three_ways_against_the_floor(tmp_path, capsys):
    from torchspec_ext.bench.__main__ import main

    out = tmp_path / "small_rows.json"
    assert main(["small_rows", "--quick", "--device", "cpu", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["rows"] for row in rows] == [1, 5]
    for row in rows:
        assert row["result"] is None  # quick sizes: no targets, and not WRONG
        assert row["ours_ms"] > 0 and row["usual_ms"] > 0 and row["swapped_ms"] > 0 and row["floor_ms"] > 0
    assert "(W @ x.T).T ms" in capsys.readouterr().out
