"""torchspec_ext.serve's parts in one process: the speculate hook, the text stream, the learner's rows
against training's teacher, the replay buffer, the queue's order and draft swaps, and learning itself."""

import asyncio
import threading
import types

import pytest
import torch

from torchspec_ext import drafts
from torchspec_ext.serve.engine import GenerationRequest, GenerationStats, LocalEngine
from torchspec_ext.serve.learner import Learner, LearnSettings, ReplayBuffer, Row, SequenceRecorder, batch_of
from torchspec_ext.serve.scheduler import QueueFull, Scheduler
from torchspec_ext.serve.text import TextStream
from torchspec_ext.speculate import TreeSpec, speculative_generate
from torchspec_ext.target import load_target, stop_token_ids
from torchspec_ext.teacher import Teacher

TREE = TreeSpec(depth=3, topk=2, max_nodes=6)


@pytest.fixture(scope="module")
def model(predictable_target):
    return load_target(predictable_target)


def new_draft(target, tokenizer):
    family = drafts.family("eagle3")
    options = family.options({"draft_vocab": 4096}).resolved(on_gpu=False)
    ids = torch.tensor(tokenizer("The capital of France is Paris. Two plus two is four. " * 8).input_ids)
    torch.manual_seed(0)
    return family, family.new_draft(target, [(ids, torch.ones_like(ids, dtype=torch.bool))], options)


def prompt_ids(tokenizer, text):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False).input_ids


def test_on_step_sees_the_targets_features_and_logits_at_every_committed_position(model):
    target, tokenizer = model
    family, draft = new_draft(target, tokenizer)
    prompt = prompt_ids(tokenizer, "Tell me about Paris.")
    calls = []
    result = speculative_generate(
        target, family.proposer(draft, TREE), prompt, 20, on_step=lambda *c: calls.append([x for x in c])
    )
    want = target.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt) :].tolist()
    assert result.tokens == want
    assert calls[0][0] == prompt[1:] and len(calls) == result.target_forwards + 1  # the prefill, then each verification
    assert max(len(c[0]) for c in calls[1:]) > 1  # some draft tokens were accepted: positions come from tree nodes
    sequence = prompt + result.tokens
    assert [t for c in calls for t in c[0]] == sequence[1:]
    # The target's own forward over the whole sequence: the hook's features and logits are its, position by position.
    out = target(torch.tensor([sequence[:-1]]), output_hidden_states=True)
    features = torch.cat([out.hidden_states[i][0] for i in draft.feature_layers], -1)
    torch.testing.assert_close(torch.cat([c[1] for c in calls]), features, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([c[2] for c in calls]), out.logits[0], rtol=0, atol=1e-5)


def test_on_step_returning_true_stops_after_those_tokens(model):
    target, tokenizer = model
    family, draft = new_draft(target, tokenizer)
    prompt = prompt_ids(tokenizer, "Count to ten.")
    seen = []

    def stop_after_first(tokens, features, logits):
        seen.append(tokens)
        return len(seen) == 2  # the prefill, then the first verification

    result = speculative_generate(target, family.proposer(draft, TREE), prompt, 30, on_step=stop_after_first)
    assert result.target_forwards == 1 and result.tokens == seen[1]


def test_one_token_prompt_has_an_empty_prefill_and_a_proposer_without_features_gets_none(model):
    target, _ = model
    calls = []
    lookup = drafts.family("lookup").proposer(None, TREE)
    result = speculative_generate(target, lookup, [5], 4, on_step=lambda *c: calls.append(c))
    tokens, features, logits = calls[0]
    assert tokens == [] and features is None and logits.shape == (0, target.config.vocab_size)
    assert all(c[1] is None for c in calls) and [t for c in calls for t in c[0]] == result.tokens


def test_recorded_row_is_what_trainings_teacher_makes_of_the_sequence(model):
    target, tokenizer = model
    family, draft = new_draft(target, tokenizer)
    engine = LocalEngine(target, tokenizer, family, draft, TREE, "tiny", stop_token_ids(target, tokenizer))
    prompt = prompt_ids(tokenizer, "What is two plus two?")
    recorder = SequenceRecorder(prompt, draft.target_to_draft(), topk=16, max_length=512)
    stats = engine.generate(GenerationRequest(prompt, 12), lambda tokens: False, recorder)
    row = recorder.row()
    n, p = len(prompt) + len(stats.tokens), len(prompt)
    assert row.input_ids.tolist() == prompt + stats.tokens
    assert row.loss_mask.tolist() == [False] * p + [True] * (n - p)
    teacher = Teacher(target, draft.feature_layers, draft.target_to_draft(), 16)
    want = teacher(row.input_ids[None], row.loss_mask[None], 0)
    torch.testing.assert_close(row.features[: n - 1], want.features[0, : n - 1], rtol=0, atol=1e-5)
    assert not row.features[n - 1].any()  # no forward saw the last token
    rows = slice(p - 1, n - 1)  # the teacher rows that predict reply tokens
    torch.testing.assert_close(row.teacher_logprobs[rows], want.teacher_logprobs[0, rows], rtol=0, atol=1e-5)
    assert torch.equal(row.teacher_indices[rows], want.teacher_indices[0, rows])
    assert torch.equal(row.teacher_argmax[rows], want.teacher_argmax[0, rows])
    assert (row.teacher_indices[: p - 1] == -1).all() and (row.teacher_argmax[n - 1] == -1)
    short = SequenceRecorder(prompt, draft.target_to_draft(), topk=16, max_length=8)
    engine.generate(GenerationRequest(prompt, 12), lambda tokens: False, short)
    cut = short.row()
    assert (
        len(cut) == 8
        and torch.equal(cut.input_ids, row.input_ids[-8:])
        and torch.equal(cut.features, row.features[-8:])
    )


class Chars:
    """A tokenizer whose token i is the i-th string of ``pieces`` (bytes of a split character joined back)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        raw = b"".join(self.pieces[i] for i in ids if self.pieces[i] != b"<eos>")
        return raw.decode("utf-8", errors="replace")


def feed(stream, ids):
    return [stream.add(i) for i in ids]


def test_text_stream_cuts_at_a_stop_string_split_over_tokens():
    tok = Chars([b"Hello", b" wor", b"ld", b" E", b"ND", b" more", b"<eos>"])
    stream = TextStream(tok, stop=[" END"], stop_token_ids=[6])
    pieces = feed(stream, [0, 1, 2, 3])
    assert "".join(p.text for p in pieces) == "Hello world"  # " E" is held back: it may start " END"
    last = stream.add(4)
    assert last.finished and stream.stop_string == " END" and stream.text == "Hello world"
    assert "".join(p.text for p in pieces + [last]) == "Hello world"


def test_text_stream_releases_what_was_held_back_when_no_stop_follows():
    tok = Chars([b"a", b" E", b"X", b"<eos>"])
    stream = TextStream(tok, stop=[" END"], stop_token_ids=[3])
    texts = [p.text for p in feed(stream, [0, 1])]
    assert texts == ["a", ""]
    assert stream.add(2).text == " EX"
    held = TextStream(tok, stop=[" END"], stop_token_ids=[3])
    feed(held, [0, 1])
    assert held.close().text == " E"  # the generation ended (max_tokens) while " E" was held back


def test_text_stream_waits_for_a_whole_character_and_stops_at_the_stop_token():
    euro = "€".encode()
    tok = Chars([b"x", euro[:1], euro[1:], b"<eos>"])
    stream = TextStream(tok, stop_token_ids=[3])
    assert [p.text for p in feed(stream, [0, 1])] == ["x", ""]
    assert stream.add(2).text == "€"
    end = stream.add(3)
    assert end.finished and end.text == "" and stream.stop_string is None


def test_text_stream_takes_the_earliest_of_several_stop_strings():
    tok = Chars([b"one two three"])
    stream = TextStream(tok, stop=["three", "two"])
    piece = stream.add(0)
    assert piece.finished and piece.text == "one " and stream.stop_string == "two"


def row(n, fill=0):
    return Row(
        input_ids=torch.full((n,), fill),
        loss_mask=torch.ones(n, dtype=torch.bool),
        features=torch.zeros(n, 4),
        teacher_indices=torch.zeros(n, 2, dtype=torch.long),
        teacher_logprobs=torch.zeros(n, 2),
        teacher_argmax=torch.zeros(n, dtype=torch.long),
    )


def test_replay_buffer_is_bounded_and_serves_fresh_rows_first():
    buffer = ReplayBuffer(capacity=10)
    for i in range(4):
        buffer.add(row(3, fill=i))
    assert buffer.positions == 9 and len(buffer) == 3  # the oldest row went: 12 positions > 10
    assert [int(r.input_ids[0]) for r in buffer.sample(2)] == [1, 2]  # never trained: oldest first
    mixed = buffer.sample(2)
    assert int(mixed[0].input_ids[0]) == 3 and int(mixed[1].input_ids[0]) in (1, 2)
    batch = batch_of([row(2, 7), row(5, 8)], 0)
    assert batch.input_ids.shape == (2, 5) and batch.loss_mask[0].tolist() == [True, True, False, False, False]
    assert (batch.teacher_indices[0, 2:] == -1).all()


class FakeEngine:
    """Records the order in which requests begin and the draft version each began with; a step emits
    one token to each running request; ``gate`` holds the first step; ``fail_at`` makes that step fail."""

    model_name, context_length, vocab_size, stop_token_ids, feature_layers = "fake", 100, 10, [], []

    def __init__(self, fail_at: int | None = None):
        self.order, self.versions, self.version = [], [], 0
        self.gate = threading.Event()
        self.started = threading.Event()
        self.running_now: list = []
        self.widest = self.steps = 0
        self.fail_at = fail_at

    @property
    def running(self):
        return len(self.running_now)

    def begin(self, request, on_tokens, on_verified=None):
        self.order.append(request.prompt[0])
        self.versions.append(self.version)
        handle = types.SimpleNamespace(request=request, on_tokens=on_tokens, done=False,
                                       stats=GenerationStats(draft_version=self.version))  # fmt: skip
        self.running_now.append(handle)
        return handle

    def step(self):
        self.started.set()
        self.gate.wait(30)
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("the step failed")
        self.widest = max(self.widest, len(self.running_now))
        for h in self.running_now:
            h.stats.tokens.append(0)
            h.stats.target_forwards += 1
            h.done = bool(h.on_tokens([0])) or len(h.stats.tokens) == h.request.max_tokens
        ended = [h for h in self.running_now if h.done]
        self.running_now = [h for h in self.running_now if not h.done]
        return ended

    def abort(self):
        ended, self.running_now = self.running_now, []
        return ended

    def trainable_draft(self):
        return None

    def update_draft(self, state, version):
        self.version = version


def test_scheduler_serves_in_arrival_order_skips_cancelled_jobs_and_swaps_drafts_between_requests():
    async def scenario():
        engine = FakeEngine()
        scheduler = Scheduler(engine, max_queue=4)
        scheduler.start()
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(GenerationRequest([0], 2), lambda t: False, loop)]
        await loop.run_in_executor(None, engine.started.wait, 30)  # job 0 runs, held at the gate
        jobs += [scheduler.submit(GenerationRequest([i], 2), lambda t: False, loop) for i in range(1, 5)]
        with pytest.raises(QueueFull):
            scheduler.submit(GenerationRequest([9], 2), lambda t: False, loop)
        jobs[2].cancel()  # waiting: never run
        scheduler.offer_draft({}, 1)  # while job 0 runs: it must keep its draft
        scheduler.offer_draft({}, 2)  # a newer offer replaces the older
        engine.gate.set()
        results = [await job.events.get() for job in jobs]
        scheduler.drain()
        return engine, scheduler, results

    engine, scheduler, results = asyncio.run(scenario())
    assert engine.order == [0, 1, 3, 4]
    assert engine.versions == [0, 2, 2, 2]
    assert scheduler.stats.draft_updates == 1
    assert scheduler.stats.requests == {"ok": 4, "cancelled": 1, "error": 0}
    assert all(kind == "stats" for kind, _ in results) and engine.widest == 1  # max_batch 1: one at a time


def test_scheduler_batches_up_to_max_batch_in_arrival_order():
    async def scenario():
        engine = FakeEngine()
        scheduler = Scheduler(engine, max_queue=8, max_batch=2)
        scheduler.start()
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(GenerationRequest([0], 3), lambda t: False, loop)]
        await loop.run_in_executor(None, engine.started.wait, 30)  # job 0 runs alone, held at the gate
        jobs += [scheduler.submit(GenerationRequest([i], 1 + i % 3), lambda t: False, loop) for i in range(1, 6)]
        scheduler.offer_draft({}, 1)  # for the requests that begin after it, not job 0
        engine.gate.set()
        results = [await job.events.get() for job in jobs]
        scheduler.drain()
        return engine, scheduler, results

    engine, scheduler, results = asyncio.run(scenario())
    assert engine.order == [0, 1, 2, 3, 4, 5] and engine.versions == [0, 1, 1, 1, 1, 1]
    assert engine.widest == 2 and not scheduler.running
    assert [len(stats.tokens) for _, stats in results] == [3, 2, 3, 1, 2, 3]
    assert scheduler.stats.requests == {"ok": 6, "cancelled": 0, "error": 0}


def test_a_failed_step_fails_its_batch_and_the_server_goes_on():
    async def scenario():
        engine = FakeEngine(fail_at=1)
        scheduler = Scheduler(engine, max_queue=8, max_batch=2)
        scheduler.start()
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(GenerationRequest([i], 2), lambda t: False, loop) for i in range(3)]
        engine.gate.set()
        results = [await job.events.get() for job in jobs]
        scheduler.drain()
        return scheduler, results

    scheduler, results = asyncio.run(scenario())
    kinds = [kind for kind, _ in results]
    assert kinds[2] == "stats" and set(kinds[:2]) <= {"error", "stats"} and "error" in kinds[:2]
    assert results[kinds.index("error")][1] == "RuntimeError: the step failed"
    assert scheduler.stats.requests["ok"] + scheduler.stats.requests["error"] == 3


def test_learning_from_served_requests_raises_their_acceptance_and_resumes(model, tmp_path):
    target, tokenizer = model
    family, draft = new_draft(target, tokenizer)
    engine = LocalEngine(target, tokenizer, family, draft, TREE, "tiny", stop_token_ids(target, tokenizer))
    prompts = [prompt_ids(tokenizer, f"Question {i}: tell me something.") for i in range(4)]
    settings = LearnSettings(topk=32, lr=3e-3, warmup_steps=1, batch_size=2, swap_interval=1)
    published = []
    learner = Learner(family, draft, settings, tmp_path, lambda s, v: published.append((s, v)), lambda: False)

    def serve_all():
        forwards = tokens = 0
        for p in prompts:
            recorder = learner.recorder(p)
            stats = engine.generate(GenerationRequest(p, 24), lambda t: False, recorder)
            learner.add(recorder)
            forwards, tokens = forwards + stats.target_forwards, tokens + len(stats.tokens)
        return tokens / forwards

    before = serve_all()
    torch.manual_seed(0)
    for _ in range(30):
        learner.step()
    engine.update_draft(*published[-1])
    after = serve_all()
    assert engine.version == 30 and learner.requests == 8
    assert after > before + 0.3, (before, after)
    learner.save()
    _, saved = drafts.load_draft(tmp_path / "draft", target)
    for name, value in learner.draft.trained_state().items():
        assert torch.equal(saved.state_dict()[name], value), name
    again = Learner(family, saved, settings, tmp_path, lambda s, v: None, lambda: False)
    assert again.steps == 30 and again.requests == 8
    assert (
        again.trainer.optimizer.state_dict()["state"].keys() == learner.trainer.optimizer.state_dict()["state"].keys()
    )


def test_the_combination_shares_its_suffix_cache_across_requests_and_draft_updates(model):
    """With --combine, the second request of the same prompt finds the first's output in the cache shared by
    the requests: fewer target forwards, the same greedy tokens; a draft update keeps the cache and the
    calibration and replaces only the draft's member."""
    from torchspec_ext.drafts.combined import CombinationSpec, Combined, LookupSpec, SuffixSpec

    target, tokenizer = model
    family, draft = new_draft(target, tokenizer)
    spec = CombinationSpec(TREE, LookupSpec(6), SuffixSpec(max_spec=6), max_nodes=6)
    engine = LocalEngine(target, tokenizer, family, draft, spec, "tiny", stop_token_ids(target, tokenizer))
    assert isinstance(engine.proposer, Combined) and engine.proposer.names == ["eagle3", "lookup", "suffix"]
    assert engine.feature_layers == list(draft.feature_layers)  # what the learner reads: the draft's layers
    prompt = prompt_ids(tokenizer, "Name three colours.")
    want = target.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    first = engine.generate(GenerationRequest(prompt, 24), lambda t: False)
    (cache,) = engine.outputs
    assert first.tokens == want and cache.outputs == 1 and cache.tokens == len(want)
    members, calibration = engine.proposer.proposers[1:], engine.proposer.calibration
    engine.update_draft({k: v.clone() for k, v in draft.trained_state().items()}, 1)
    assert engine.proposer.proposers[1:] == members and engine.proposer.calibration is calibration
    assert engine.outputs[0] is cache
    again = engine.generate(GenerationRequest(prompt, 24), lambda t: False)
    assert again.tokens == want and again.draft_version == 1 and cache.outputs == 2
    assert again.target_forwards < first.target_forwards, (first.target_forwards, again.target_forwards)


@pytest.mark.parametrize("combine", [False, True])
def test_requests_decoded_together_answer_as_each_alone(model, combine):
    """The engine's batch: requests of different lengths begun at different steps, each with its own
    draft state (the EAGLE-3 draft reads each row's own features), answer as plain decoding does, step
    for step as each would alone; an update between two begins reaches only the later request."""
    from torchspec_ext.drafts.combined import CombinationSpec, LookupSpec, SuffixSpec

    target, tokenizer = model
    family, draft = new_draft(target, tokenizer)
    spec = CombinationSpec(TREE, LookupSpec(6), SuffixSpec(max_spec=6), max_nodes=6) if combine else TREE
    make = lambda: LocalEngine(target, tokenizer, family, draft, spec, "tiny", stop_token_ids(target, tokenizer))
    prompts = [prompt_ids(tokenizer, q) for q in ("Name three colours.", "What is two plus two?", "Say hello.")]
    lengths = [20, 9, 14]
    alone = []
    for p, n in zip(prompts, lengths):
        solo = make()
        alone.append(solo.begin(GenerationRequest(p, n), lambda t: False))
        while solo.running:
            solo.step()
    engine = make()
    first = engine.begin(GenerationRequest(prompts[0], lengths[0]), lambda t: False)
    engine.step()
    engine.update_draft({k: v.clone() for k, v in draft.trained_state().items()}, 1)  # the same weights, version 1
    rest = [engine.begin(GenerationRequest(p, n), lambda t: False) for p, n in zip(prompts[1:], lengths[1:])]
    assert engine.running == 3 and engine.draft is not draft  # running requests keep the module they began with
    ended = []
    while engine.running:
        ended += engine.step()
    assert len(ended) == 3
    for running, solo, p, n in zip([first, *rest], alone, prompts, lengths):
        want = target.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p) :].tolist()
        assert running.stats.tokens == solo.stats.tokens == want
        if not combine:  # a combination's calibration and cache learn from the other requests: its trees differ
            assert running.sequence.result.accepted_per_step == solo.sequence.result.accepted_per_step
    assert [r.stats.draft_version for r in (first, *rest)] == [0, 1, 1]


def test_serve_combine_builds_the_combination_from_the_command_line(predictable_target):
    from torchspec_ext.drafts.combined import Combined
    from torchspec_ext.options import parse
    from torchspec_ext.serve.server import ServeConfig, load_engine

    argv = ["--target", str(predictable_target), "--draft", "lookup", "--dtype", "float32", "--max-nodes", "5"]
    config = parse(ServeConfig, [*argv, "--combine", "--suffix-cache-tokens", "1000"])
    engine = load_engine(config)
    # Prompt lookup is the draft here: the combination is it and suffix decoding, once each.
    assert isinstance(engine.proposer, Combined) and engine.proposer.names == ["lookup", "suffix"]
    assert engine.proposer.max_nodes == 5 and engine.outputs[0].max_tokens == 1000
    assert engine.proposer.node_cost >= 0  # measured on this machine at the start
    assert not isinstance(load_engine(parse(ServeConfig, [*argv, "--no-combine"])).proposer, Combined)


def test_the_server_warms_up_before_taking_requests_and_keeps_nothing_of_it(model, predictable_target, tmp_path):
    from torchspec_ext import small_rows
    from torchspec_ext.options import parse
    from torchspec_ext.serve.server import ServeConfig, load_engine

    _, draft = new_draft(*model)
    draft.save(tmp_path)
    argv = ["--target", str(predictable_target), "--draft", str(tmp_path), "--dtype", "float32", "--min-prob", "0"]
    small_rows._fastest.clear()
    engine = load_engine(parse(ServeConfig, argv))  # the combination, by default
    linears = [m for net in (engine.target, engine.draft) for m in net.modules()]
    linears = [m for m in linears if isinstance(m, small_rows.SmallRowsLinear)]
    assert any(m in linears for m in engine.draft.modules())
    # Every weight's way, the target's and the draft's, is chosen (the one-time timings done) before
    # the first request...
    for m in linears:
        assert (*m.weight.shape, m.weight.dtype, m.bfloat16_copy, 1) in small_rows._fastest
    # ...and the warm-up's output is not in the requests' suffix cache.
    assert [cache.outputs for cache in engine.outputs] == [0]


def test_the_measured_stream_is_distinct_seeded_and_asks_second_turns_after_first_ones():
    from transformers import AutoTokenizer

    from torchspec_ext.serve.measure import build_stream
    from torchspec_ext.target import default_target_dir

    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    stream = build_stream(tokenizer, 300, 1024, seed=0)
    assert len(stream) == 300 and len({t.item.turns[t.turn] for t in stream}) == 300
    assert {t.key.split("/")[0] for t in stream} == {"mt-bench", "humaneval"}
    where = {t.key: i for i, t in enumerate(stream)}
    for key, i in where.items():
        if key.endswith("/1"):
            assert where[key[:-1] + "0"] < i, key
    assert [t.key for t in build_stream(tokenizer, 300, 1024, seed=0)] == list(where)
    assert [t.key for t in build_stream(tokenizer, 300, 1024, seed=1)] != list(where)
