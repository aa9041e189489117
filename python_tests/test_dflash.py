"""The DFlash and DSpark draft families (torchspec_ext.drafts.dflash): the block attention against a
dense float64 reference, training blocks equal to the drafter's, the drafter's slots and Markov bias,
greedy speculative decoding equal to plain decoding in every mode and sampling distributed as the
target's (with a draft that is accepted), anchors, each objective and its gradients against an eager
float64 reference, the options, saving and loading (the training metadata kept; a folder of one
family refused by another's loader, naming both), and train -> export -> eval on a tiny target
(greedy outputs equal to plain decoding)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from torchspec_ext import drafts, ops
from torchspec_ext.drafts.dflash import DFlashConfig, DFlashDraft, DFlashDrafter
from torchspec_ext.drafts.dflash.config import default_target_layers
from torchspec_ext.drafts.dflash.loss_parts import dpace_weights, topk_acceptance, topk_cross_entropy, topk_logits
from torchspec_ext.drafts.dflash.model import block_attention
from torchspec_ext.drafts.dflash.objective import sample_blocks, supervised_rows
from torchspec_ext.eval import main as eval_main
from torchspec_ext.export import main as export_main
from torchspec_ext.teacher import Teacher
from torchspec_ext.train import main as train_main
from torchspec_ext.training.losses import loss_function

from conftest import chi_square_of_draws, write_chat

VOCAB, MASK = 300, 299
PROMPT = [5, 17, 42, 99, 123, 7]


@pytest.fixture(scope="module")
def target():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_draft(target, family="dflash", noise=0.05, **options) -> DFlashDraft:
    """A draft of ``family`` for ``target``, its weights moved away from their start (so that every one matters)."""
    fam = drafts.family(family)
    values = dict(block_size=6, draft_layers=2, num_anchors=4, mask_token_id=MASK) | options
    if family == "dspark":
        values.setdefault("markov_rank", 8)
    draft = fam.new_draft(target, [], fam.Options(**values).resolved(False))
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * noise)
    return draft


def features(target, draft, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = target.model(ids, output_hidden_states=True).hidden_states
    return torch.cat([hidden[i] for i in draft.feature_layers], -1)


# ---- the block attention ---------------------------------------------------------------------------


def dense_attention(q, kc, vc, kb, vb, anchors, window):
    """float64, one query at a time: slot k of the block at anchor a sees context keys j < a (and
    j > a + k - window with a window) and every key of its block (its slots <= k with a window)."""
    b, h, g, n, bs, d = q.shape
    t = kc.shape[-2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for bi in range(b):
        for ni in range(n):
            a = int(anchors[bi, ni])
            for k in range(bs):
                keys = [j for j in range(t) if j < a and (window is None or j > a + k - window)]
                own = [i for i in range(bs) if window is None or i <= k]
                for hi in range(h):
                    kk = torch.cat([kc[bi, hi, keys], kb[bi, hi, ni, own]]).double()
                    vv = torch.cat([vc[bi, hi, keys], vb[bi, hi, ni, own]]).double()
                    for gi in range(g):
                        w = torch.softmax(kk @ q[bi, hi, gi, ni, k].double() / math.sqrt(d), 0)
                        out[bi, hi, gi, ni, k] = w @ vv
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_block_attention_against_dense_reference(window):
    b, h, g, n, bs, d, t = 2, 2, 3, 3, 5, 8, 13
    q = torch.randn(b, h, g, n, bs, d)
    kc, vc = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    kb, vb = torch.randn(b, h, n, bs, d), torch.randn(b, h, n, bs, d)
    anchors = torch.tensor([[0, 4, 12], [7, 2, 9]])  # anchor 0: no context at all
    c = DFlashConfig(64, 64, 6, 2, d, VOCAB, 1, bs, MASK, [1], sliding_window=window)
    context_allowed, block_allowed = DFlashDraft(c).attention_masks(anchors, t)[window is not None]
    got = block_attention(q, kc, vc, context_allowed, kb, vb, block_allowed, 1 / math.sqrt(d))
    want = dense_attention(q, kc, vc, kb, vb, anchors, window)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---- training blocks are what decoding computes ----------------------------------------------------


@pytest.mark.parametrize("family", ["dflash", "dspark"])
@pytest.mark.parametrize("window", [None, 4])
def test_training_blocks_are_what_the_drafter_computes(target, family, window):
    """The block at anchor a, run with the whole row's context and its mask (training), is the block
    the drafter runs after the context ids[:a + 1], fed the features of ids[:a] (decoding)."""
    draft = make_draft(target, family, sliding_window=window).eval()
    ids = torch.randint(0, VOCAB - 1, (1, 30))
    feats = features(target, draft, ids)
    anchors = torch.tensor([[0, 3, 11, 24, 29]])
    with torch.no_grad():
        block_ids, positions = draft.block_inputs(ids, anchors)
        hidden = draft.run_blocks(draft.context(feats), block_ids, positions, draft.attention_masks(anchors, 30))
    drafter = DFlashDrafter(draft)
    for n, a in enumerate(anchors[0].tolist()):
        drafter.reset(feats[0, :a])
        drafter.next_logprobs(ids[0, : a + 1].tolist(), [[]])
        torch.testing.assert_close(drafter.hidden, hidden[0, n], rtol=0, atol=2e-5)
    # Fed in pieces (observe), the buffers hold the same keys as fed at once.
    drafter.reset(feats[0, :5])
    drafter.next_logprobs(ids[0, :6].tolist(), [[]])
    drafter.observe(feats[0, 5:24])
    drafter.next_logprobs(ids[0, :25].tolist(), [[]])
    torch.testing.assert_close(drafter.hidden, hidden[0, 3], rtol=0, atol=2e-5)


def test_drafter_slots_and_markov_bias(target):
    """DFlash: a path of length L reads slot L + 1; DSpark: slot L, plus the Markov bias of the path's
    last token (the anchor's for the empty path)."""
    ids = torch.randint(0, VOCAB - 1, (1, 12))
    for family in ("dflash", "dspark"):
        draft = make_draft(target, family).eval()
        drafter = DFlashDrafter(draft)
        drafter.reset(features(target, draft, ids)[0, :-1])
        context = ids[0].tolist()
        got = drafter.next_logprobs(context, [[], [7], [7, 9]])
        logits = drafter.logits
        if family == "dflash":
            want = torch.log_softmax(logits[[1, 2, 3]], -1)
        else:
            m = draft.markov_head
            bias = m.markov_w2(m.markov_w1(torch.tensor([context[-1], 7, 9]))).float()
            want = torch.log_softmax(logits[[0, 1, 2]] + bias, -1)
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="proposes"):
            drafter.next_logprobs(context, [[1] * draft.config.proposals])


@pytest.fixture(scope="module")
def peaked_target(target):
    """The target with its LM head scaled up: at temperature 1 its likeliest tokens take a fifth of
    the probability or more (the random target's are nearly uniform), so a draft is accepted when sampling."""
    peaked = copy.deepcopy(target)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(16.0)
    return peaked


@pytest.fixture(scope="module")
def accepted_drafts(peaked_target):
    """Per family, a draft trained a little on the peaked target's greedy continuations of PROMPT and 7
    random prompts, so that decoding commits its tokens (made once per module)."""
    made = {}

    def draft_of(family: str) -> DFlashDraft:
        if family not in made:
            made[family] = _train_on_greedy_continuations(peaked_target, family)
        return made[family]

    return draft_of


def _train_on_greedy_continuations(target, family: str) -> DFlashDraft:
    torch.manual_seed(0)  # the draft's initial weights, whichever test asks first
    fam = drafts.family(family)
    prompts = torch.randint(0, VOCAB - 1, (8, len(PROMPT)), generator=torch.Generator().manual_seed(0))
    prompts[0] = torch.tensor(PROMPT)
    with torch.no_grad():
        rows = target.generate(prompts, max_new_tokens=34, do_sample=False)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[:, len(PROMPT) :] = True
    draft = make_draft(target, family, noise=0.0, block_loss="teacher", num_anchors=16)
    values = dict(block_size=6, draft_layers=2, num_anchors=16, mask_token_id=MASK, block_loss="teacher")
    options = fam.Options(**values, **({"markov_rank": 8} if family == "dspark" else {})).resolved(False)
    batch = Teacher(target, draft.feature_layers, draft.target_to_draft(), 8)(rows, mask, 0)
    optimizer = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    loss = loss_function("topk_kl", ops)
    for _ in range(80):
        optimizer.zero_grad()
        draft(batch, loss, options).total.backward()
        optimizer.step()
    return draft.eval()


@pytest.mark.parametrize("family", ["dflash", "dspark"])
def test_greedy_decoding_is_plain_decoding_in_every_mode(peaked_target, accepted_drafts, family):
    """With a draft that is accepted (so the paths that commit draft tokens run), in every mode its
    family evaluates: speculative greedy decoding is the target's greedy decoding token for token."""
    from torchspec_ext.speculate import speculative_generate

    fam, draft = drafts.family(family), accepted_drafts(family)
    with torch.no_grad():
        want = peaked_target.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0, len(PROMPT) :]
    modes = fam.fit_modes(draft, fam.decode_modes(4, 3, 9, 0.0))
    assert len(modes) == (3 if family == "dspark" else 2)
    for name, spec in modes.items():
        result = speculative_generate(peaked_target, fam.proposer(draft, spec), PROMPT, 24)
        assert result.tokens == want.tolist(), name
        assert sum(result.accepted_per_step) > 0, name  # draft tokens were committed


SAMPLING_DRAWS = 1500


@pytest.mark.parametrize(("family", "mode"), [("dflash", "tree"), ("dspark", "block")])
def test_sampling_is_the_targets_own(peaked_target, accepted_drafts, family, mode):
    """Lossless sampling end to end (the verification op's own chi-square test, through the drafter,
    the proposal and speculative decoding's bookkeeping): at temperature 1, with a draft that is
    accepted, the first emitted token is distributed as the target's softmax after the prompt, and
    the second, after the likeliest first, as its softmax there. Chi-square against float64
    probabilities, 1500 draws, a fixed seed."""
    from torchspec_ext.speculate import SpeculativeBatch

    fam, draft = drafts.family(family), accepted_drafts(family)
    spec = fam.fit_modes(draft, fam.decode_modes(4, 3, 9, 0.0))[mode]
    generator, results = torch.Generator().manual_seed(5), []
    for _ in range(SAMPLING_DRAWS // 250):  # 250 sequences a batch: one target forward verifies them all
        batch = SpeculativeBatch(peaked_target)
        seqs = [batch.add(fam.proposer(draft, spec), PROMPT, 2, 1.0, [], generator) for _ in range(250)]
        while batch.sequences:
            batch.step()
        results += [s.result for s in seqs]
    assert sum(sum(r.accepted_per_step) for r in results) > SAMPLING_DRAWS / 10  # draft tokens were committed
    first = torch.tensor([r.tokens[0] for r in results])
    likeliest = int(torch.mode(first).values)
    second = torch.tensor([r.tokens[1] for r in results if r.tokens[0] == likeliest])
    with torch.no_grad():
        logits = peaked_target(torch.tensor([PROMPT + [likeliest]])).logits[0, -2:].double()
    probs = torch.softmax(logits, -1)
    assert probs[0].max() < 0.5  # the first token is not nearly certain: the test has something to find
    assert chi_square_of_draws(first, probs[0]) > 1e-3
    assert len(second) > 200 and chi_square_of_draws(second, probs[1]) > 1e-3


# ---- anchors -----------------------------------------------------------------------------------------


def test_anchors_are_drawn_inside_the_replies():
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5:12] = True  # 6 valid anchors (5..10: the token and the next one supervised)
    mask[1, 3] = mask[1, 8:10] = True  # 1 valid anchor: 8
    draws = set()
    for _ in range(20):
        blocks = sample_blocks(mask, 4)
        a, keep = blocks.anchors, blocks.keep
        assert keep.sum(1).tolist() == [4, 1, 0]
        for row, valid in ((0, set(range(5, 11))), (1, {8})):
            chosen = a[row][keep[row]].tolist()
            assert set(chosen) <= valid and len(set(chosen)) == len(chosen)
        draws.add(tuple(a[0].tolist()))
    assert len(draws) > 5  # a new draw each time (each pass over a replayed batch)
    assert sample_blocks(torch.zeros(2, 9, dtype=torch.bool), 4).keep.sum() == 0


def test_default_target_layers_are_the_published_ones():
    """z-lab's build_target_layer_ids, plus one (Hugging Face hidden_states indices): Qwen3-8B's 5
    layers 1, 9, 17, 25, 33 of 36 -> 2, 10, 18, 26, 34."""
    assert default_target_layers(36, 5) == [2, 10, 18, 26, 34]
    assert default_target_layers(30, 5) == [2, 9, 15, 21, 28]  # round(7.5) is 8, as in z-lab's Python
    assert default_target_layers(36, 1) == [19]


# ---- objectives against an eager float64 reference ------------------------------------------------


def teacher_batch(target, draft, rows=2, length=40, topk=8):
    ids = torch.randint(0, VOCAB - 1, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, 8:] = True
    mask[-1, length - 9 :] = False
    return Teacher(target, draft.feature_layers, draft.target_to_draft(), topk)(ids, mask, 0)


def reference_objective(draft, batch, options, blocks):
    """The objective from the dense [rows, V] logits in float64 (the same blocks, hidden states from
    the draft's own forward), per slot weight exp(-j / gamma) for the j-th predicted token."""
    c = draft.config
    hidden = draft.run_blocks(
        draft.context(batch.features), *draft.block_inputs(batch.input_ids, blocks.anchors),
        draft.attention_masks(blocks.anchors, batch.input_ids.shape[1]),
    )  # fmt: skip
    b_idx, n_idx, slot = supervised_rows(draft.config, blocks, batch.loss_mask)
    pos = blocks.anchors[b_idx, n_idx] + slot + 1
    h = hidden[b_idx, n_idx, slot + (0 if c.sample_from_anchor else 1)].double()
    weight = draft.lm_head.weight.double()
    logits = h @ weight.T
    prev_embed = None
    if c.is_dspark:
        m = draft.markov_head
        prev_embed = m.markov_w1(batch.input_ids[b_idx, pos - 1]).double()
        logits = logits + prev_embed @ m.markov_w2.weight.double().T
    logq = torch.log_softmax(logits, -1)
    token = batch.input_ids[b_idx, pos]
    t_idx, t_lp = batch.teacher_indices[b_idx, pos - 1], batch.teacher_logprobs[b_idx, pos - 1].double()
    decay = torch.exp(-slot.double() / options.loss_decay_gamma)
    ce = -logq.gather(1, token[:, None]).squeeze(1)
    p_hat = torch.softmax(t_lp, -1)
    kl = -(p_hat * logq.gather(1, t_idx)).sum(-1)
    if options.block_loss == "ce":
        return (decay * ce).sum() / decay.sum()
    if options.block_loss == "teacher":
        return kl.mean()  # the run's loss (topk_kl): its value is the plain mean; the gradient is checked apart
    if options.block_loss == "dpace":
        w = dpace_weights(ce.detach().float(), (b_idx, n_idx, slot), blocks.anchors.shape, c.proposals,
                          options.dpace_alpha).double()  # fmt: skip
        return (w * ce).mean()
    q = logq.exp()
    p_top = t_lp.exp()
    q_top = q.gather(1, t_idx)
    alpha = torch.minimum(p_top, q_top).sum(-1) + torch.minimum(
        (1 - p_top.sum(-1)).clamp(min=0), (1 - q_top.sum(-1)).clamp(min=0)
    )
    features_all = h if prev_embed is None else torch.cat([h, prev_embed], -1)
    proj = draft.confidence_head.proj
    conf = features_all @ proj.weight.double().T[:, 0] + proj.bias.double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(conf, alpha.detach(), reduction="none")
    per_row = 0.1 * kl + 0.9 * 2 * (1 - alpha) + bce
    return (decay * per_row).sum() / decay.sum()


@pytest.mark.parametrize(
    "family, block_loss", [("dflash", "ce"), ("dflash", "dpace"), ("dflash", "teacher"), ("dspark", "dspark")]
)
def test_objective_and_gradients_against_the_reference(target, family, block_loss):
    draft = make_draft(target, family, block_loss=block_loss, num_anchors=5)
    options = drafts.family(family).Options(block_size=6, num_anchors=5, block_loss=block_loss).resolved(False)
    batch = teacher_batch(target, draft)
    torch.manual_seed(3)
    got = draft(batch, loss_function("topk_kl", ops), options)
    got.total.backward()
    mine = {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}
    draft.zero_grad()
    torch.manual_seed(3)  # the same draw of anchors
    blocks = sample_blocks(batch.loss_mask, options.num_anchors)
    want = reference_objective(draft, batch, options, blocks)
    if block_loss == "teacher":  # the gradient is of the decayed mean: check it on its own
        with torch.no_grad():
            torch.testing.assert_close(got.total.double(), want, rtol=1e-5, atol=1e-5)
        want = _teacher_decayed(draft, batch, options, blocks)
    else:
        torch.testing.assert_close(got.total.double(), want, rtol=1e-5, atol=1e-5)
    want.backward()
    for name, grad in mine.items():
        ref = dict(draft.named_parameters())[name].grad
        assert ref is not None, name
        torch.testing.assert_close(grad.double(), ref.double(), rtol=1e-3, atol=1e-6, msg=name)
    assert len(got.losses) == len(got.accuracies) == draft.config.proposals


@pytest.mark.parametrize("block_loss", ["ce", "dpace"])
def test_losses_on_the_data_tokens_need_no_teacher_top_k(target, block_loss, tmp_path):
    """ce and dpace read only the data's tokens: their teacher skips the LM head (top-k of 0), and the
    objective and gradients on its batch are those on a batch with the top-k; the batch survives the
    teacher cache's round trip."""
    from safetensors.torch import load_file, save_file

    from torchspec_ext.teacher import TeacherBatch

    draft = make_draft(target, block_loss=block_loss, num_anchors=5)
    options = drafts.family("dflash").Options(block_size=6, num_anchors=5, block_loss=block_loss).resolved(False)
    torch.manual_seed(0)
    full = teacher_batch(target, draft)
    bare = Teacher(target, draft.feature_layers, draft.target_to_draft(), 0)(full.input_ids, full.loss_mask, 0)
    assert bare.teacher_indices.shape == (*full.input_ids.shape, 0) and (bare.teacher_argmax == -1).all()
    save_file(bare.tensors(), str(tmp_path / "batch.safetensors"))
    bare = TeacherBatch.from_tensors(load_file(str(tmp_path / "batch.safetensors")), "cache")
    torch.testing.assert_close(bare.features, full.features)
    results = []
    for batch in (full, bare):
        draft.zero_grad()
        torch.manual_seed(3)  # the same anchors
        got = draft(batch, loss_function("topk_kl", ops), options)
        got.total.backward()
        results.append((got, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}))
    (with_topk, grads), (without, bare_grads) = results
    torch.testing.assert_close(without.total, with_topk.total)
    torch.testing.assert_close(torch.stack(without.losses), torch.stack(with_topk.losses))
    assert grads.keys() == bare_grads.keys() and all(torch.equal(grads[n], bare_grads[n]) for n in grads)
    assert 0 <= min(without.accuracies) and max(without.accuracies) <= 1  # against the data's tokens


@pytest.mark.parametrize(
    "argv, topk",
    [
        (["--draft-family", "dflash"], 0),
        (["--draft-family", "dflash", "--block-loss", "dpace"], 0),
        (["--draft-family", "dflash", "--block-loss", "teacher"], 32),
        (["--draft-family", "dspark"], 32),
        (["--draft-family", "eagle3"], 32),
    ],
)
def test_the_teacher_runs_its_lm_head_only_for_losses_that_read_it(argv, topk):
    from torchspec_ext.train import parse_args

    assert parse_args([*argv, "--topk", "32", "--device", "cpu"]).teacher_topk == topk


def _teacher_decayed(draft, batch, options, blocks):
    c = draft.config
    hidden = draft.run_blocks(
        draft.context(batch.features), *draft.block_inputs(batch.input_ids, blocks.anchors),
        draft.attention_masks(blocks.anchors, batch.input_ids.shape[1]),
    )  # fmt: skip
    b_idx, n_idx, slot = supervised_rows(draft.config, blocks, batch.loss_mask)
    pos = blocks.anchors[b_idx, n_idx] + slot + 1
    h = hidden[b_idx, n_idx, slot + (0 if c.sample_from_anchor else 1)].double()
    logq = torch.log_softmax(h @ draft.lm_head.weight.double().T, -1)
    t_idx, t_lp = batch.teacher_indices[b_idx, pos - 1], batch.teacher_logprobs[b_idx, pos - 1].double()
    kl = -(torch.softmax(t_lp, -1) * logq.gather(1, t_idx)).sum(-1)
    decay = torch.exp(-slot.double() / options.loss_decay_gamma)
    return (decay * kl).sum() / decay.sum()


def test_dspark_teacher_loss_trains(target):
    draft = make_draft(target, "dspark")
    options = drafts.family("dspark").Options(block_size=6, num_anchors=4, block_loss="teacher").resolved(False)
    out = draft(teacher_batch(target, draft), loss_function("lk-alpha", ops), options)
    out.total.backward()
    assert torch.isfinite(out.total) and draft.markov_head.markov_w2.weight.grad.abs().sum() > 0
    assert draft.confidence_head.proj.weight.grad.abs().sum() > 0


def test_topk_estimates_match_the_fused_op():
    """The acceptance and cross-entropy per row the confidence head and the reports use are the fused
    op's: their means are its lk_lambda (KL weight 0: 1 - mean acceptance) and kl values."""
    torch.manual_seed(1)
    n, v, h, k = 37, 211, 24, 9
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.3
    teacher = torch.log_softmax(torch.randn(n, v) * 2, -1)
    logprobs, ids = teacher.topk(k, -1)
    ids[3, 4:] = -1  # tokens outside the draft's vocabulary
    value, _, lse = ops.draft_topk_kl(hidden, weight, ids, logprobs)
    lam, _, _ = ops.draft_topk_kl(hidden, weight, ids, logprobs, loss="lk_lambda", kl_scale=0.0)
    logits = topk_logits(hidden, weight, ids, chunk=8)
    torch.testing.assert_close(topk_acceptance(logits, lse, ids, logprobs).mean(), 1 - lam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(topk_cross_entropy(logits, lse, ids, logprobs).mean(), value, rtol=1e-5, atol=1e-6)


def test_options_are_checked():
    from torchspec_ext.training.config import parse_args

    assert parse_args(["--draft-family", "dflash", "--device", "cpu"]).family_options.block_loss == "dpace"
    assert parse_args(["--draft-family", "dspark", "--device", "cpu"]).family_options.block_loss == "dspark"
    options = parse_args(["--draft-family", "dflash", "--device", "cpu", "--num-anchors", "7"]).family_options
    assert options.num_anchors == 7 and options.block_size == 16 and options.draft_layers == 5
    with pytest.raises(SystemExit):  # DSpark's loss is not DFlash's
        parse_args(["--draft-family", "dflash", "--block-loss", "dspark"])
    with pytest.raises(SystemExit):  # a DSpark option in a DFlash run
        parse_args(["--draft-family", "dflash", "--markov-rank", "4"])
    with pytest.raises(SystemExit):  # a DFlash option in an EAGLE-3 run
        parse_args(["--block-size", "8"])
    assert parse_args(["--device", "cpu"]).family_options.ttt_steps == 3  # EAGLE-3's, untouched


# ---- train -> save -> eval -------------------------------------------------------------------------


def test_saved_drafts_keep_how_they_were_trained(target, tmp_path):
    """config.json's "training" (what eval renders prompts by) is written by save and read back by load,
    for both families; the trained weights come back as saved."""
    for family in ("dflash", "dspark"):
        draft = make_draft(target, family)
        draft.metadata = {"chat_template": "{{ messages }}", "chat_probe": "probe", "loss": "topk_kl"}
        draft.save(tmp_path / family)
        found, loaded = drafts.load_draft(tmp_path / family, target)
        assert found.name == family and loaded.metadata == draft.metadata
        for name, tensor in draft.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
        draft.metadata = {}
        draft.save(tmp_path / f"{family}-bare")
        assert drafts.load_draft(tmp_path / f"{family}-bare", target)[1].metadata == {}


def test_a_folder_of_one_family_is_refused_by_the_others(target, tmp_path):
    from torchspec_ext.drafts import DraftLoadError

    make_draft(target, "dflash").save(tmp_path / "dflash")
    make_draft(target, "dspark").save(tmp_path / "dspark")
    eagle3 = drafts.family("eagle3")
    sample = [(torch.randint(0, VOCAB, (40,)), torch.ones(40, dtype=torch.bool))]
    eagle3.new_draft(target, sample, eagle3.Options(draft_vocab=64).resolved(False)).save(tmp_path / "eagle3")
    for folder, other, titles in (
        ("eagle3", "dflash", ("EAGLE-3", "DFlash")),
        ("eagle3", "dspark", ("EAGLE-3", "DSpark")),
        ("dflash", "eagle3", ("DFlash", "EAGLE-3")),
        ("dflash", "dspark", ("DFlash", "DSpark")),
        ("dspark", "dflash", ("DSpark", "DFlash")),
    ):
        with pytest.raises(DraftLoadError) as caught:
            drafts.family(other).load(tmp_path / folder, target)
        assert all(title in str(caught.value) for title in titles), (folder, other, str(caught.value))


def test_train_save_export_and_eval_a_dflash_draft(predictable_target, tmp_path, capsys):
    """A few steps of ``train --draft-family dflash`` on the tiny target; its draft, and its export,
    evaluated by ``eval --draft``: greedy outputs equal to plain decoding, the modes no deeper than the
    block proposes, and the training's chat template kept through export."""
    argv = [
        "--target", predictable_target, "--data", write_chat(tmp_path / "chat.json"), "--output-dir", tmp_path / "out",
        "--draft-family", "dflash", "--block-size", 4, "--draft-layers", 2, "--num-anchors", 4, "--max-steps", 2,
        "--batch-size", 2, "--max-length", 64, "--topk", 16, "--eval-prompts", 1, "--eval-new-tokens", 4,
        "--eval-interval", 0, "--held-out", 0.2, "--warmup-steps", 1, "--target-dtype", "float32",
    ]  # fmt: skip
    assert train_main([str(a) for a in argv]) == 0
    assert export_main([str(tmp_path / "out"), "--out", str(tmp_path / "export")]) == 0
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Tell me something.", {"turns": ["What is two plus two?", "And three?"]}]))
    capsys.readouterr()
    for name in ("out/draft", "export"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["architectures"] == ["DFlashDraftModel"] and config["training"]["chat_template"]
        assert eval_main(["--target", str(predictable_target), "--draft", str(tmp_path / name), "--prompts",
                          str(prompts), "--max-new-tokens", "8", "--dtype", "float32", "--json"]) == 0  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert report["header"]["family"] == "DFlash" and report["header"]["template_warning"] is None
        modes = report["header"]["modes"]
        assert {modes[m]["depth"] for m in ("block", "tree")} == {3}  # a block of 4 proposes 3
        assert modes["combined"]["tree"]["depth"] == 3  # the combination's tree too
        rows = {r["mode"]: r for r in report["rows"]}
        assert {"plain", "block", "tree"} <= set(rows)
        for r in rows.values():
            assert r["same_as_plain"] == r["compared_with_plain"] == 3, r["mode"]
        assert len(rows["block"]["per_position_acceptance"]) == 3
