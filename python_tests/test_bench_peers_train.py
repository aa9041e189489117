"""``bench peers-train``: skipped without SpecForge, with the line that installs it; its harness end to end
on a tiny target with a fake peer (our own recipe standing in for SpecForge's), and its pieces alone.
The conversion of SpecForge's drafts is tested in test_specforge_convert.py."""

import argparse
import importlib.util
import json
import math

import pytest
import torch

from torchspec_ext import drafts
from torchspec_ext.bench import __main__ as bench_cli
from torchspec_ext.bench import (
    peers_context,
    peers_eval,
    peers_losses,
    peers_recipes,
    peers_timing,
    peers_train,
    specforge_recipes,
)
from torchspec_ext.bench.common import Skipped
from torchspec_ext.drafts.eagle3 import Eagle3Draft
from torchspec_ext.training.budget import Plan
from torchspec_ext.training.streams import Passes

from conftest import write_chat


def parse(argv):
    parser = argparse.ArgumentParser(parents=[bench_cli.shared_arguments()])
    peers_train.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def no_specforge(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "specforge" else real(name, *a))


def test_skipped_without_specforge_with_the_install_line(no_specforge, tmp_path):
    with pytest.raises(
        Skipped, match=r"pip install --no-deps specforge==0\.2\.0 && pip install 'torchspec_ext\[peers\]'"
    ):
        peers_train.run(parse(["--device", "cpu", "--quick", "--out", str(tmp_path)]))
    assert bench_cli.main(["all", "--parts", "peers-train", "--device", "cpu", "--out", str(tmp_path)]) == 0
    part = json.loads((tmp_path / "report.json").read_text())["parts"]["peers-train"]
    assert part["status"] == "skipped" and "specforge==0.2.0" in part["reason"]


def test_peers_train_is_a_part_of_bench_all():
    assert "peers-train" in bench_cli.BENCHMARKS and bench_cli.parse_parts("peers-train") == ["peers-train"]


class FakePeer(peers_recipes.Ours):
    """Our recipe under the peer's name, with another default learning rate: the harness cannot tell."""

    def __init__(self, context):
        super().__init__(context)
        self.name, self.default_lr = "specforge", 1e-3

    def describe(self):
        return {"fake": True}


def fake_peer(monkeypatch):
    monkeypatch.setitem(peers_recipes.RECIPES, "specforge", FakePeer)
    monkeypatch.setattr(specforge_recipes, "specforge_problem", lambda: None)


def tiny_options(tiny_target, tmp_path):
    data = write_chat(tmp_path / "chat.json", count=120)
    return ["--device", "cpu", "--quick", "--target", str(tiny_target), "--data", str(data), "--max-length", "64"]


def test_recipes_end_to_end_on_a_tiny_target_with_a_fake_peer(tiny_target, tmp_path, monkeypatch):
    fake_peer(monkeypatch)
    out = tmp_path / "out"
    argv = tiny_options(tiny_target, tmp_path) + [
        "--minutes",
        "0.05",
        "--specforge-lrs",
        "1e-3,3e-3",
        "--out",
        str(out),
    ]
    report = peers_train.run(parse(argv + ["--max-new-tokens", "8"]))
    rows = report.rows
    assert [r["recipe"].split(" (")[0] for r in rows] == ["ours", "specforge lr=0.001", "specforge lr=0.003"]
    for row in rows:
        done, planned = map(int, row["steps"].split("/"))
        assert 1 <= done <= planned and 1 <= row["batches"] <= planned
        assert row["new_s"] > row["teacher_s"] > 0 and row["replay_s"] > 0 and row["validation_al"] >= 1
    drafts = out / "seed-0"
    assert {p.name for p in drafts.iterdir() if (p / "config.json").is_file()} >= {
        "ours",
        "specforge-lr-0.001",
        "specforge-lr-0.003",
    }
    best = max(rows[1:], key=lambda r: r["validation_al"])
    evaluated = [rows[0], rows[1], best]
    for row in rows:
        cells = [row.get(f"{s} {m}") for s in peers_context.SETS for m in peers_context.MODES]
        if any(row is r for r in evaluated):
            assert all(c is not None and c >= 1 for c in cells), row
        else:
            assert all(c is None for c in cells), row
    assert "(best of the sweep)" in best["recipe"] or best is rows[1]
    assert (drafts / "ours" / "eval.json").is_file() and (drafts / "specforge-lr-0.001" / "eval.json").is_file()
    assert rows[0]["speedup"] > 0 and rows[0]["al_ratio"] > 0 and rows[0]["result"] is None  # quick: no targets
    saved = json.loads((out / "recipes.json").read_text())
    assert saved["benchmark"] == "peers-train" and len(saved["rows"]) == 3
    assert "load average (1 min) at start, end" in report.header and "| ours |" in report.markdown()


@pytest.mark.skipif(
    importlib.util.find_spec("specforge") is None, reason="SpecForge is not installed (pip install --no-deps specforge)"
)
def test_specforge_recipe_fits_one_batch_and_its_draft_runs_in_our_eval(tiny_target, tmp_path):
    """SpecForge's own step on a batch captured from our target: its loss falls at every one of repeated
    steps at lr 1e-3, and the exported draft loads and decodes through our eval."""
    args = parse(tiny_options(tiny_target, tmp_path) + ["--out", str(tmp_path / "out")])
    context = peers_context.make_context(args, peers_context.Settings.of(args), 0)
    recipe = peers_recipes.SpecForge(context)
    batch = recipe.make_batch(0)
    trainer = recipe.trainer(8, 1e-3)
    losses = [trainer.step(batch) for _ in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # a draft that trains: it falls every step
    folder = trainer.export(tmp_path / "draft")
    assert Eagle3Draft.load(folder).config.feature_layers == [i + 1 for i in recipe.recipe.capture_layers]
    assert peers_eval.validation_acceptance(context, folder, 4) >= 1


@pytest.mark.skipif(
    importlib.util.find_spec("specforge") is None, reason="SpecForge is not installed (pip install --no-deps specforge)"
)
def test_specforge_dflash_recipe_fits_one_batch_and_its_draft_runs_in_our_eval(tiny_target, tmp_path):
    """SpecForge's DFlash step on a batch captured from our target, with our draft's anchor count and mask
    token: with anchors at every position of these short conversations (so each step sees the same blocks)
    its loss falls at every one of repeated steps, and the exported draft loads as ours and decodes through
    our eval."""
    argv = tiny_options(tiny_target, tmp_path) + ["--family", "dflash", "--out", str(tmp_path / "out")]
    args = parse(argv)
    context = peers_context.make_context(args, peers_context.Settings.of(args), 0)
    recipe = peers_recipes.SpecForge(context)
    described = recipe.recipe.describe()
    assert described["strategy"] == "dflash" and described["num_anchors"] == 16  # ours on a CPU
    recipe.recipe.num_anchors = 512  # more than any conversation here has positions
    batch = recipe.make_batch(0)
    trainer = recipe.trainer(32, 1e-3)  # the learning rate stays well above zero for 8 steps
    losses = [trainer.step(batch) for _ in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    folder = trainer.export(tmp_path / "draft")
    family, draft = drafts.load_draft(folder, context.target)
    assert family.name == "dflash" and draft.config.mask_token_id == context.run.draft.config.mask_token_id
    assert draft.config.feature_layers == [i + 1 for i in recipe.recipe.capture_layers]
    assert peers_eval.validation_acceptance(context, folder, 4) >= 1


@pytest.mark.skipif(
    importlib.util.find_spec("specforge") is None, reason="SpecForge is not installed (pip install --no-deps specforge)"
)
def test_specforge_dflash_drops_what_its_preprocessing_drops(tiny_target, tmp_path, monkeypatch):
    """A conversation without two consecutive supervised tokens is left out of SpecForge's DFlash batch, as
    its preprocessing leaves it out; a batch of nothing else is no step, and the last loss stands."""
    args = parse(tiny_options(tiny_target, tmp_path) + ["--family", "dflash", "--out", str(tmp_path / "out")])
    context = peers_context.make_context(args, peers_context.Settings.of(args), 0)
    recipe = peers_recipes.SpecForge(context)
    real = specforge_recipes.tokenize_conversation
    starved = {0}

    def tokenize(tokenizer, conversation, max_length):
        ids, mask = real(tokenizer, conversation, max_length)
        if conversation == context.batches.conversations_of(0)[0] or 1 in starved:
            mask = torch.zeros_like(mask)
            mask[-1] = True  # one supervised token, no pair
        return ids, mask

    monkeypatch.setattr(specforge_recipes, "tokenize_conversation", tokenize)
    batch = recipe.make_batch(0)
    assert batch is not None and batch.sample_ids == ["0/1"]
    trainer = recipe.trainer(4, 1e-3)
    assert math.isnan(trainer.step(None))
    loss = trainer.step(batch)
    starved.add(1)
    assert recipe.make_batch(0) is None and trainer.step(None) == loss


def test_our_dflash_draft_takes_the_layers_asked_for(tiny_target, tmp_path):
    """--draft-layers sizes our DFlash draft (SpecForge's recipe keeps its own); its default ce loss
    reads no teacher top-k, so our teacher runs no LM head. EAGLE-3 refuses the option."""
    argv = tiny_options(tiny_target, tmp_path) + ["--family", "dflash", "--draft-layers", "1", "--out", str(tmp_path)]
    args = parse(argv)
    context = peers_context.make_context(args, peers_context.Settings.of(args), 0)
    assert context.run.draft.config.num_hidden_layers == 1 and context.run.online.teacher.topk == 0
    with pytest.raises(SystemExit, match="--draft-layers sets our DFlash draft's layers"):
        peers_train.run(parse(["--draft-layers", "1", "--out", str(tmp_path)]))


def test_losses_refuse_a_family_other_than_eagle3(tmp_path):
    with pytest.raises(SystemExit, match="--compare losses compares EAGLE-3 losses"):
        peers_train.run(parse(["--compare", "losses", "--family", "dflash", "--out", str(tmp_path)]))


def test_losses_end_to_end_on_a_tiny_target_with_a_fake_peer(tiny_target, tmp_path, monkeypatch):
    fake_peer(monkeypatch)
    argv = tiny_options(tiny_target, tmp_path) + ["--compare", "losses", "--losses", "topk_kl,specforge-kl"]
    report = peers_train.run(parse(argv + ["--seeds", "0,1", "--steps", "3", "--out", str(tmp_path / "out")]))
    runs = [r for r in report.rows if isinstance(r["seed"], int)]
    assert [(r["loss"], r["seed"]) for r in runs] == [
        ("topk_kl", 0),
        ("specforge-kl", 0),
        ("topk_kl", 1),
        ("specforge-kl", 1),
    ]
    assert all(r["steps"] == 3 and r["batches"] == 1 for r in runs)  # 3 steps over 1 teacher batch (3 epochs)
    assert [r["lr"] for r in runs] == [3e-3, 1e-3, 3e-3, 1e-3]  # ours' default; the peer's
    summary = {r["loss"]: r for r in report.rows if not isinstance(r["seed"], int)}
    assert set(summary) == {"topk_kl: mean", "topk_kl: spread", "specforge-kl: mean", "specforge-kl: spread"}
    for name in peers_context.SETS:
        values = [r[f"{name} tree"] for r in runs if r["loss"] == "topk_kl"]
        assert summary["topk_kl: mean"][f"{name} tree"] == pytest.approx(sum(values) / 2)
        assert summary["topk_kl: spread"][f"{name} tree"] == pytest.approx(max(values) - min(values))
    assert "beats_kl" in summary["specforge-kl: mean"] and "beats_kl" not in summary["topk_kl: mean"]


class CountingRecipe:
    name = "counting"

    def __init__(self):
        self.made = []

    def make_batch(self, j):
        self.made.append(j)
        return j


class RecordingTrainer:
    lr = 0.1

    def __init__(self):
        self.seen = []

    def step(self, batch):
        self.seen.append(batch)
        return float(batch)


def test_train_makes_each_teacher_batch_once_and_replays_it_in_our_passes_order():
    recipe, trainer = CountingRecipe(), RecordingTrainer()
    done = peers_timing.train(recipe, trainer, Plan(7, 3), 5, None, "counting")
    passes = Passes(3, 5, lambda j: j)
    assert trainer.seen == [passes.batch(i) for i in range(7)]  # our --epochs replay's order
    assert sorted(recipe.made) == [0, 1, 2] and done.batches == 3 and done.steps == 7
    assert (
        len(done.new_seconds) == 3 and len(done.replay_seconds) == 4 and done.losses == [float(b) for b in trainer.seen]
    )


def test_train_stops_when_the_budget_is_spent():
    done = peers_timing.train(CountingRecipe(), RecordingTrainer(), Plan(5, 2), 0, 0.0, "counting")
    assert done.steps == 0 and done.batches == 0 and done.planned_steps == 5


def test_plan_is_train_budget_plan_from_the_measured_costs():
    # 54 s usable (90% of a minute); a new batch costs 10 s, of which 8 the teacher; each step 2 s:
    # (8 + 3 * 2) s per teacher batch trained on 3 times -> 3 batches, 9 steps.
    costs = {"new_s": 10.0, "replay_s": 2.0}
    assert peers_timing.plan_for(costs, 1.0, 3, 100) == Plan(9, 3)
    assert peers_timing.plan_for(costs, 1.0, 3, 2) == Plan(6, 2)
    assert peers_timing.plan_for(costs, 1.0, 1, 100) == Plan(5, 5)
    # Not one teacher batch fits: one anyway (its run's deadline cuts it short).
    assert peers_timing.plan_for({"new_s": 100.0, "replay_s": 30.0}, 1.0, 3, 100) == Plan(3, 1)
    assert peers_timing.plan_for({"new_s": 100.0, "replay_s": 90.0}, 1.0, 3, 100) == Plan(3, 1)


def test_the_validation_reserve_leaves_batches_to_train_on():
    assert peers_context.reserved_batches(8588) == peers_context.VALIDATION_RESERVE
    assert peers_context.reserved_batches(10) == 5 and peers_context.reserved_batches(2) == 1


def test_loss_summary_means_spreads_and_wins_beyond_the_spread():
    def row(loss, seed, tree):
        cells = {f"{s} {m}": tree[s] for s in peers_context.SETS for m in peers_context.MODES}
        return {"loss": loss, "seed": seed} | cells | {f"{s} speed-up": 1.0 for s in peers_context.SETS}

    kl = {"mt-bench": 1.5, "humaneval": 1.6, "sharegpt": 1.4}
    rows = [
        row("topk_kl", 0, kl),
        row("topk_kl", 1, kl | {"mt-bench": 1.7}),
        row("lk-alpha", 0, {"mt-bench": 1.8, "humaneval": 1.65, "sharegpt": 1.3}),
        row("lk-alpha", 1, {"mt-bench": 1.75, "humaneval": 1.5, "sharegpt": 1.5}),
    ]
    summary = {r["loss"]: r for r in peers_losses.loss_summary(rows, ["topk_kl", "lk-alpha"])}
    assert summary["topk_kl: mean"]["mt-bench tree"] == pytest.approx(1.6)
    assert summary["topk_kl: spread"]["mt-bench tree"] == pytest.approx(0.2)
    assert summary["lk-alpha: spread"]["humaneval chain"] == pytest.approx(0.15)
    # mt-bench: lk's worst (1.75) beats kl's best (1.7); humaneval and sharegpt overlap.
    assert summary["lk-alpha: mean"]["beats_kl"] == "mt-bench"


def test_eval_cells_take_each_set_and_mode():
    results = {
        (s, m): {"acceptance_length": 1.5, "speedup": 0.9} for s in peers_context.SETS for m in ("chain", "tree")
    }
    cells = peers_eval.eval_cells(results)
    assert cells["humaneval chain"] == 1.5 and cells["sharegpt speed-up"] == 0.9
    assert peers_eval.eval_cells({})["mt-bench tree"] is None
    assert sorted(c.key for c in peers_eval.eval_columns()) == sorted(cells)


def test_settings_quick_and_full_defaults():
    quick = peers_context.Settings.of(parse(["--quick"]))
    full = peers_context.Settings.of(parse(["--minutes", "3"]))
    assert (quick.minutes, quick.max_length, quick.limit) == (0.5, 128, 1)
    assert (full.minutes, full.max_length, full.limit, full.steps) == (3.0, 512, 16, 120)
    with pytest.raises(SystemExit):
        parse(["--losses", "topk_kl,nonsense"])
