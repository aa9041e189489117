import copy

import pytest
import torch

from torchspec_ext import small_rows
from torchspec_ext.small_rows import SmallRowsLinear, enable_small_rows


@pytest.fixture
def forced(monkeypatch):
    """Sets which way every (shape, dtype, rows) takes, instead of timing them."""
    table = {}
    monkeypatch.setattr(small_rows, "_faster_swapped", table)

    def force(linear, swapped: bool):
        for rows in small_rows.SMALL_ROWS:
            table[(*linear.weight.shape, linear.weight.dtype, rows)] = swapped

    return force


@pytest.mark.parametrize("swapped", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 48), (1, 5, 48), (2, 4, 48), (9, 48), (0, 48)])
def test_small_rows_linear_matches_float64(forced, swapped, bias, shape):
    torch.manual_seed(len(shape) * 10 + shape[0])
    linear = torch.nn.Linear(48, 33, bias=bias).requires_grad_(False)
    forced(linear, swapped)
    x = torch.randn(shape)
    b = None if linear.bias is None else linear.bias.double()
    want = torch.nn.functional.linear(x.double(), linear.weight.double(), b)
    enable_small_rows(linear)
    assert type(linear) is SmallRowsLinear
    got = linear(x)
    assert got.shape == (*shape[:-1], 33) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_swapped_way_is_taken_only_where_it_won(forced, monkeypatch):
    linear = torch.nn.Linear(16, 8, bias=False).requires_grad_(False)
    enable_small_rows(linear)
    forced(linear, True)
    calls = []
    real = small_rows._swapped
    monkeypatch.setattr(small_rows, "_swapped", lambda w, x: calls.append(x.shape[0]) or real(w, x))
    linear(torch.randn(3, 16))
    linear(torch.randn(12, 16))  # beyond the small counts: the usual way
    assert calls == [3]
    forced(linear, False)
    linear(torch.randn(3, 16))
    assert calls == [3]


def test_the_first_use_measures_and_remembers(monkeypatch):
    table = {}
    monkeypatch.setattr(small_rows, "_faster_swapped", table)
    monkeypatch.setattr(small_rows, "OUT_OF_CACHE_BYTES", 1 << 16)
    monkeypatch.setattr(small_rows, "MEASURED_FROM_BYTES", 1 << 12)
    linear, tiny = torch.nn.Linear(64, 32).requires_grad_(False), torch.nn.Linear(8, 8).requires_grad_(False)
    enable_small_rows(torch.nn.Sequential(linear, tiny))
    linear(torch.randn(2, 64))
    assert sorted(table) == [(32, 64, torch.float32, r) for r in small_rows.SMALL_ROWS]
    assert all(isinstance(won, bool) for won in table.values())
    tiny(torch.randn(2, 8))  # too small to be worth measuring: the usual way
    assert all(not table[8, 8, torch.float32, r] for r in small_rows.SMALL_ROWS)


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
        forced(m, True)
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
