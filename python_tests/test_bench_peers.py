"""The benchmark report's flashinfer peer columns (topk and tree): absent without CUDA or without
flashinfer, with the reason in the header; with a fake flashinfer (CPU, torch) injected, called
with the arguments the real one takes and timed into its own column."""

import argparse
import sys
import time
import types

import torch

from torchspec_ext.bench import common, topk, tree
from torchspec_ext.bench.report import fmt_num

PEER_SLEEP_S = 0.02  # the fake peer's own time, so that its column can be told from ours


def run_part(module):
    """The part's report on the CPU (small_cases: a few small cases)."""
    return module.run(argparse.Namespace(device="cpu", quick=True, repeat=1))


def small_cases(monkeypatch):
    """Each part runs a peer case and a case without the peer, both small."""
    f32, bf16 = torch.float32, torch.bfloat16
    topk_cases = [topk.Case(topk.TOPK, 32, 4096, 16, f32), topk.Case(topk.LINEAR, 32, 4096, 16, f32, h=64)]
    tree_cases = [tree.Case(tree.GREEDY, 2, 8, bf16, vocab=1024), tree.Case(tree.SAMPLING, 3, 8, bf16, vocab=1024)]
    monkeypatch.setattr(topk, "default_cases", lambda device, quick: topk_cases)
    monkeypatch.setattr(tree, "default_cases", lambda device, quick: tree_cases)


def cell(report, title, row_index):
    """The Markdown table's cell under column ``title`` in row ``row_index``."""
    lines = [line for line in report.markdown().splitlines() if line.startswith("|")]
    titles = [c.strip() for c in lines[0].strip("|").split("|")]
    return [c.strip() for c in lines[2 + row_index].strip("|").split("|")][titles.index(title)]


def assert_no_peer_and_still_correct(report, reason):
    assert report.header["peer"].startswith(f"did not run: {reason}")
    for row in report.rows:
        assert "flashinfer_ms" not in row and row["ours_ms"] > 0
        assert not str(row.get("result")).startswith("WRONG")
    title = "flashinfer top_k ms" if report.name == "topk" else "flashinfer chain ms"
    assert all(cell(report, title, i) == "—" for i in range(len(report.rows)))


def test_without_cuda_the_peer_does_not_run(monkeypatch):
    small_cases(monkeypatch)
    monkeypatch.setitem(sys.modules, "flashinfer", make_fake_flashinfer([]))  # even where it imports
    for module in (topk, tree):
        assert_no_peer_and_still_correct(run_part(module), "needs CUDA (this run is on cpu)")


def test_without_flashinfer_the_peer_does_not_run(monkeypatch):
    small_cases(monkeypatch)
    monkeypatch.setattr(common, "peers_can_run", lambda device: True)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # as if not installed: the import fails
    for module in (topk, tree):
        report = run_part(module)
        assert_no_peer_and_still_correct(report, "not installed")
        assert "pip install flashinfer-python" in report.header["peer"]


def make_fake_flashinfer(calls: list) -> types.ModuleType:
    """A flashinfer with the real signatures of ``top_k`` and ``sampling.chain_speculative_sampling``
    (flashinfer/topk.py and flashinfer/sampling.py), on any device, that checks what it is given."""

    def top_k(input, k, sorted=False, deterministic=False, tie_break=0):
        assert input.dim() == 2 and input.dtype in (torch.float32, torch.float16, torch.bfloat16), input
        assert isinstance(k, int) and 0 < k <= input.shape[1] and sorted is True  # ours is sorted too
        calls.append(("top_k", tuple(input.shape), input.dtype, k))
        time.sleep(PEER_SLEEP_S)
        values, indices = torch.topk(input, k)
        return values, indices  # input dtype, int64

    def chain_speculative_sampling(
        draft_probs,
        draft_token_ids,
        target_probs,
        maybe_output_accepted_token_num=None,
        maybe_output_emitted_draft_token_num=None,
        deterministic=True,
        generator=None,
        seed=None,
        offset=None,
    ):
        batch, n, vocab = draft_probs.shape
        assert draft_probs.dtype == torch.float32 and target_probs.dtype == torch.float32
        assert draft_token_ids.shape == (batch, n) and draft_token_ids.dtype == torch.int32
        assert target_probs.shape == (batch, n + 1, vocab)
        assert torch.allclose(target_probs.sum(-1), torch.ones(batch, n + 1), atol=1e-4)
        ids = draft_token_ids.long().unsqueeze(-1)
        # Point-mass drafts: all of each draft row's mass on its draft token.
        assert torch.equal(draft_probs.gather(-1, ids), torch.ones(batch, n, 1))
        assert torch.equal(draft_probs.sum(-1), torch.ones(batch, n))
        assert isinstance(generator, torch.Generator) and generator.device == draft_probs.device
        calls.append(("chain_speculative_sampling", (batch, n, vocab)))
        fake.chain_args = (draft_token_ids, target_probs)
        time.sleep(PEER_SLEEP_S)
        # Rejection sampling: accept draft j with p(x) / q(x), stop at the first rejection.
        u = torch.rand(batch, n, generator=generator)
        accepted = u < target_probs[:, :n].gather(-1, ids).squeeze(-1) / draft_probs.gather(-1, ids).squeeze(-1)
        emitted = accepted.int().cumprod(-1).sum(-1)
        out = torch.full((batch, n + 1), -1, dtype=torch.int32)
        for b, e in enumerate(emitted.tolist()):
            out[b, :e] = draft_token_ids[b, :e]
            last = target_probs[b, e] - (draft_probs[b, e] if e < n else 0)
            out[b, e] = int(torch.multinomial(last.clamp_min(0), 1, generator=generator))
        return out, accepted.int().sum(-1, dtype=torch.int32), emitted.to(torch.int32)

    fake = types.ModuleType("flashinfer")
    fake.__version__ = "0.0-fake"
    fake.top_k = top_k
    fake.sampling = types.SimpleNamespace(chain_speculative_sampling=chain_speculative_sampling)
    return fake


def test_fake_flashinfer_is_called_right_and_timed_into_its_column(monkeypatch):
    small_cases(monkeypatch)
    calls = []
    monkeypatch.setattr(common, "peers_can_run", lambda device: True)
    monkeypatch.setitem(sys.modules, "flashinfer", make_fake_flashinfer(calls))

    report = run_part(topk)
    assert report.header["peer"].startswith("flashinfer 0.0-fake. flashinfer.top_k(logits, k, sorted=True)")
    selection, linear = report.rows
    assert isinstance(selection["flashinfer_ms"], float), selection.get("flashinfer_error")
    assert selection["flashinfer_ms"] >= PEER_SLEEP_S * 1e3 and selection["flashinfer_max_error"] == 0
    assert cell(report, "flashinfer top_k ms", 0) == fmt_num()(selection["flashinfer_ms"])
    assert "flashinfer_ms" not in linear and cell(report, "flashinfer top_k ms", 1) == "—"
    assert calls and set(calls) == {("top_k", (32, 4096), torch.float32, 16)}

    calls.clear()
    report = run_part(tree)
    greedy, sampling = report.rows
    assert isinstance(sampling["flashinfer_ms"], float), sampling.get("flashinfer_error")
    assert sampling["flashinfer_ms"] >= PEER_SLEEP_S * 1e3 and 0 <= sampling["flashinfer_accepted"] <= 7
    assert cell(report, "flashinfer chain ms", 1) == fmt_num()(sampling["flashinfer_ms"])
    assert "flashinfer_ms" not in greedy and cell(report, "flashinfer chain ms", 0) == "—"
    # A chain of T = 8 nodes: 7 draft tokens and a bonus position.
    assert calls and set(calls) == {("chain_speculative_sampling", (3, 7, 1024))}
    # Aligned: the bench drafts the target's argmax at each parent, so draft j is the argmax of target_probs[:, j].
    draft_token_ids, target_probs = sys.modules["flashinfer"].chain_args
    assert torch.equal(draft_token_ids.long(), target_probs[:, :-1].argmax(-1))


def test_a_failing_peer_is_recorded_and_the_part_goes_on(monkeypatch):
    small_cases(monkeypatch)
    fake = make_fake_flashinfer([])

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    fake.top_k = broken
    fake.sampling = types.SimpleNamespace()  # an API without chain_speculative_sampling
    monkeypatch.setattr(common, "peers_can_run", lambda device: True)
    monkeypatch.setitem(sys.modules, "flashinfer", fake)

    row = run_part(topk).rows[0]
    assert row["flashinfer_ms"] == "failed" and row["flashinfer_error"] == "RuntimeError: no kernel for this GPU"
    assert row["ours_ms"] > 0 and row["result"] is None
    report = run_part(tree)
    row = report.rows[1]
    assert row["flashinfer_ms"] == "failed" and "chain_speculative_sampling" in row["flashinfer_error"]
    assert cell(report, "flashinfer chain ms", 1) == "failed" and row["ours_ms"] > 0
