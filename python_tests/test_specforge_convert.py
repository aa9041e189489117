"""The conversion of SpecForge EAGLE-3 drafts to our folder layout: on a folder written as SpecForge writes
one, the refusals with their reasons, and, where SpecForge is installed, on a real random SpecForge draft
against its own training forward (the logits of every training-time-test step)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from torchspec_ext.bench import specforge_recipes
from torchspec_ext.bench.specforge_convert import ConversionError, convert_specforge_draft
from torchspec_ext.drafts.eagle3 import DraftConfig, Eagle3Draft

HAS_SPECFORGE = importlib.util.find_spec("specforge") is not None


def tiny_draft(seed=0):
    """A random EAGLE-3 draft with every weight random (norms too) and a vocabulary of 24 of 64 ids."""
    torch.manual_seed(seed)
    config = DraftConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        vocab_size=64, draft_vocab_size=24, rms_norm_eps=1e-5, rope_theta=5000.0, max_position_embeddings=128,
        feature_layers=[2, 3, 5],
    )  # fmt: skip
    draft = Eagle3Draft(config)
    with torch.no_grad():
        for p in draft.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    draft.set_vocab(torch.randperm(64)[:24].sort().values)
    return draft


def specforge_config(draft, **changes):
    """config.json as SpecForge's save_pretrained writes it for this draft (transformers 5: rope_parameters)."""
    c = draft.config
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size, "rms_norm_eps": c.rms_norm_eps, "num_hidden_layers": 1,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"}, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
        "pretraining_tp": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    return config | changes


def write_specforge_folder(directory, draft, **changes):
    """A folder laid out as SpecForge exports an EAGLE-3 draft: its tensor names, the embedding included."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(specforge_config(draft, **changes)))
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def logits(draft, features, ids, steps):
    ids_ext = torch.cat([ids, torch.zeros(ids.shape[0], steps + 1, dtype=torch.long)], 1)
    return [draft.lm_head(h) for h in draft.unroll(features, ids_ext, steps)]


def test_a_specforge_folder_converts_to_ours_with_the_same_logits(tmp_path):
    draft = tiny_draft()
    source = write_specforge_folder(tmp_path / "specforge", draft)
    out = convert_specforge_draft(source, tmp_path / "ours", [1, 2, 4], metadata={"loss": "specforge-kl"})
    converted = Eagle3Draft.load(out)
    assert converted.config.feature_layers == [2, 3, 5]  # SGLang's capture layers, one higher
    assert converted.config.rope_theta == 5000.0 and converted.metadata == {"loss": "specforge-kl"}
    assert torch.equal(converted.draft_to_target(), draft.draft_to_target()) and torch.equal(converted.t2d, draft.t2d)
    assert "embed_tokens.weight" not in load_file(str(out / "model.safetensors"))
    converted.embed_tokens.weight.data.copy_(draft.embed_tokens.weight)  # the target's, as eval loads it
    features, ids = torch.randn(2, 9, 96), torch.randint(0, 64, (2, 9))
    for a, b in zip(logits(draft, features, ids, 3), logits(converted, features, ids, 3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"fc_norm": True}, "fc_norm"),
        ({"norm_output": False}, "norm_output"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
        ({"target_hidden_size": 64}, "target_hidden_size 64"),
        ({"num_hidden_layers": 2}, "2 decoder layers"),
        ({"attention_bias": True}, "attention_bias"),
        ({"architectures": ["LlamaForCausalLMEagle"]}, "architectures"),
    ],
)
def test_a_draft_ours_cannot_run_alike_is_refused_with_the_reason(tmp_path, changes, reason):
    source = write_specforge_folder(tmp_path / "specforge", tiny_draft(), **changes)
    with pytest.raises(ConversionError, match=reason):
        convert_specforge_draft(source, tmp_path / "ours", [1, 2, 4])
    assert not (tmp_path / "ours").exists()


def test_conversion_needs_the_capture_layers_and_a_consistent_vocabulary(tmp_path):
    draft = tiny_draft()
    source = write_specforge_folder(tmp_path / "a", draft)
    with pytest.raises(ConversionError, match="capture layers"):
        convert_specforge_draft(source, tmp_path / "ours", None)
    named = write_specforge_folder(
        tmp_path / "b", draft, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 3]}
    )  # a config that names them wins
    assert Eagle3Draft.load(convert_specforge_draft(named, tmp_path / "ours")).config.feature_layers == [1, 2, 4]
    draft.t2d[draft.draft_to_target()[0]] = False
    with pytest.raises(ConversionError, match="t2d"):
        convert_specforge_draft(write_specforge_folder(tmp_path / "c", draft), tmp_path / "ours2", [1, 2, 4])


@pytest.mark.skipif(not HAS_SPECFORGE, reason="SpecForge is not installed (pip install --no-deps specforge==0.2.0)")
def test_a_real_specforge_draft_converts_with_the_logits_of_its_own_training_forward(tmp_path):
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from specforge.utils import padding
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        architectures=["LlamaForCausalLMEagle3"], hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, draft_vocab_size=24, num_hidden_layers=1,
        rms_norm_eps=1e-5, max_position_embeddings=128, rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
    )  # fmt: skip
    model = LlamaForCausalLMEagle3(config, attention_backend="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        ids = torch.randperm(64)[:24].sort().values
        model.d2t.copy_(ids - torch.arange(24))
        model.t2d.zero_()
        model.t2d[ids] = True
    steps, features, raw = 3, torch.randn(2, 9, 96), torch.randint(0, 64, (2, 9))
    recorded = []
    compute_logits = model.compute_logits
    model.compute_logits = lambda hidden: recorded.append(compute_logits(hidden)) or recorded[-1]
    trainer = OnlineEagle3Model(model, length=steps, attention_backend="sdpa")
    with specforge_recipes.cpu_adapted(), torch.no_grad():
        # What its strategy hands it: the ids shifted once (TargetHead.preprocess), loss mask [B, T, 1].
        trainer(
            input_ids=padding(raw, left=False), attention_mask=torch.ones(2, 9, dtype=torch.long),
            target=torch.randn(2, 9, 64), loss_mask=torch.ones(2, 9, 1), hidden_states=features,
        )  # fmt: skip
    assert len(recorded) == steps
    model.compute_logits = compute_logits
    model.save_pretrained(tmp_path / "specforge")
    out = convert_specforge_draft(tmp_path / "specforge", tmp_path / "ours", [0, 1, 3])
    ours = Eagle3Draft.load(out)
    ours.embed_tokens.weight.data.copy_(model.embed_tokens.weight)
    with torch.no_grad():
        mine = logits(ours, features, raw, steps)
    for step, (theirs, own) in enumerate(zip(recorded, mine)):
        assert theirs.abs().max() > 1  # not a degenerate case
        torch.testing.assert_close(own, theirs, rtol=1e-4, atol=1e-4, msg=f"TTT step {step}")


@pytest.mark.skipif(not HAS_SPECFORGE, reason="SpecForge is not installed (pip install --no-deps specforge==0.2.0)")
def test_a_real_specforge_dflash_draft_converts_with_the_outputs_of_its_own_forward(tmp_path):
    """SpecForge's DFlashDraftModel, every weight random, saved as SpecForge saves it: once converted,
    our draft's block over the same context features gives its hidden states."""
    from specforge.modeling.draft.dflash import DFlashDraftModel
    from transformers import Qwen3Config

    from torchspec_ext import drafts
    from torchspec_ext.bench.specforge_convert import convert_specforge_dflash

    torch.manual_seed(0)
    config = Qwen3Config(
        architectures=["DFlashDraftModel"], hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, num_hidden_layers=2, num_target_layers=6, block_size=4,
        layer_types=["full_attention"] * 2, rms_norm_eps=1e-5, max_position_embeddings=128,
        rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
        dflash_config={"target_layer_ids": [1, 3], "mask_token_id": 5},
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = DFlashDraftModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    embedding = torch.nn.Embedding(64, 32)
    t, block = 7, torch.tensor([[9, 5, 5, 5]])
    features = torch.randn(1, t, 64)
    with torch.no_grad():
        theirs = model(
            position_ids=torch.arange(t + 4)[None], noise_embedding=embedding(block), target_hidden=features
        )  # fmt: skip
    model.save_pretrained(tmp_path / "specforge")
    out = convert_specforge_dflash(tmp_path / "specforge", tmp_path / "ours", {"note": "converted"})
    family, ours = drafts.load_draft(out)
    assert family.name == "dflash" and ours.metadata == {"note": "converted"}
    assert ours.config.feature_layers == [2, 4] and ours.config.mask_token_id == 5 and ours.config.block_size == 4
    ours.embed_tokens.weight.data.copy_(embedding.weight)
    anchors = torch.tensor([[t]])
    with torch.no_grad():
        mine = ours.run_blocks(
            ours.context(features), block[None], t + torch.arange(4)[None, None], ours.attention_masks(anchors, t)
        )
    assert theirs.abs().max() > 0.5  # not a degenerate case
    torch.testing.assert_close(mine[0], theirs, rtol=1e-4, atol=1e-4)
