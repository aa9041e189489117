"""Exporting a draft as the EAGLE-3 checkpoint SGLang and vLLM load, and loading drafts back
(export CLI, Eagle3Draft.load, eval's --draft DIR), on a tiny random Llama target."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from torchspec_ext.drafts.eagle3 import DraftConfig, Eagle3Draft, Eagle3Drafter
from torchspec_ext.export import main as export_main
from torchspec_ext.speculate import TreeSpec, speculative_generate

VOCAB, DRAFT_VOCAB, LAYERS = 300, 100, 6
WEIGHT_KEYS = {
    "fc.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def target():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
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


def make_draft(target) -> Eagle3Draft:
    draft = Eagle3Draft(DraftConfig.from_target(target.config, DRAFT_VOCAB))
    draft.set_vocab(torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values)
    draft.init_from_target(target)
    with torch.no_grad():  # away from the init values, so that every tensor matters
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return draft


def training_output(tmp_path, draft, step=5):
    """The layout python -m torchspec_ext.train writes: checkpoints/step-N (+ trainer.pt) and latest."""
    out = tmp_path / "run"
    step_dir = out / "checkpoints" / f"step-{step:08d}"
    draft.save(step_dir)
    torch.save({"step": step}, step_dir / "trainer.pt")
    (out / "checkpoints" / "latest").write_text(step_dir.name)
    return out, step_dir


def features_of(target, draft, ids):
    with torch.no_grad():
        hidden = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hidden[i][0] for i in draft.config.feature_layers], -1)


def logprobs(target, draft, ids, paths):
    drafter = Eagle3Drafter(draft)
    drafter.reset(features_of(target, draft, ids[:-1]))
    return drafter.next_logprobs(ids, paths)


IDS = [5, 17, 42, 99, 123, 7, 250, 3]
PATHS = [[], [11], [11, 12], [40]]


def test_export_of_a_training_run(target, tmp_path, capsys):
    draft = make_draft(target)
    run, _ = training_output(tmp_path, draft)
    out = tmp_path / "export"
    assert export_main([str(run), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "LlamaForCausalLMEagle3" in summary[0] and "step-00000005" in summary[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".export*"))  # no staging folder left behind

    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == WEIGHT_KEYS  # no embed_tokens: SGLang and vLLM take the target's
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
    assert all(v.dtype == torch.bfloat16 for k, v in weights.items() if k not in ("d2t", "t2d"))  # by default
    target_ids = torch.arange(DRAFT_VOCAB) + weights["d2t"]  # how SGLang and vLLM read d2t
    assert torch.equal(target_ids, draft.draft_to_target())
    assert weights["t2d"].shape == (VOCAB,) and int(weights["t2d"].sum()) == DRAFT_VOCAB
    assert weights["t2d"][target_ids].all()
    assert weights["fc.weight"].shape == (64, 3 * 64) and weights["lm_head.weight"].shape == (DRAFT_VOCAB, 64)
    assert weights["midlayer.self_attn.q_proj.weight"].shape == (64, 2 * 64)
    for k, v in draft.trained_state().items():
        assert torch.equal(weights[k], v.to(torch.bfloat16) if v.is_floating_point() else v), k

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == VOCAB and config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["hidden_size"] == config["target_hidden_size"] == 64
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["torch_dtype"] == "bfloat16" and "torchspec_ext" not in config
    layers = [2, LAYERS // 2, LAYERS - 3]
    assert draft.config.feature_layers == layers
    assert config["eagle_aux_hidden_state_layer_ids"] == layers  # vLLM: input of decoder layer i
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in layers]  # SGLang: output of i
    assert config["eagle_config"]["use_aux_hidden_state"] is True

    # What export wrote loads back into the same draft, up to bfloat16's rounding.
    loaded = Eagle3Draft.load(out, target)
    assert loaded.config.feature_layers == layers
    want, got = logprobs(target, draft, IDS, PATHS), logprobs(target, loaded, IDS, PATHS)
    kept = torch.isfinite(want)
    assert torch.equal(kept, torch.isfinite(got))
    assert torch.allclose(got[kept], want[kept], atol=0.05)


def test_export_sources_and_replacement(target, tmp_path, capsys):
    draft = make_draft(target)
    run, step_dir = training_output(tmp_path, draft)
    out = tmp_path / "export"
    assert export_main([str(step_dir), "--out", str(out)]) == 0  # a checkpoint directory
    assert export_main([str(out), "--out", str(tmp_path / "again")]) == 0  # an export re-exports
    bf16 = draft.fc.weight.to(torch.bfloat16)
    assert torch.equal(load_file(str(tmp_path / "again" / "model.safetensors"))["fc.weight"], bf16)
    # output-dir/draft when there is no checkpoint; an earlier export at --out is replaced.
    final = make_draft(target)
    (run / "checkpoints" / "latest").unlink()
    final.save(run / "draft")
    assert export_main([str(run), "--out", str(out)]) == 0
    assert torch.equal(load_file(str(out / "model.safetensors"))["fc.weight"], final.fc.weight.to(torch.bfloat16))
    assert "run/draft" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_in_another_dtype(target, tmp_path, dtype):
    """--dtype float32 keeps the trained weights bit for bit; float16 rounds them."""
    draft = make_draft(target)
    draft.save(tmp_path / "draft")
    out = tmp_path / "other"
    name = str(dtype).removeprefix("torch.")
    assert export_main([str(tmp_path / "draft"), "--out", str(out), "--dtype", name]) == 0
    weights = load_file(str(out / "model.safetensors"))
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
    for k, v in draft.trained_state().items():
        if k not in ("d2t", "t2d"):
            assert weights[k].dtype == dtype and torch.equal(weights[k], v.to(dtype)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == name
    loaded = Eagle3Draft.load(out, target)
    want, got = logprobs(target, draft, IDS, PATHS), logprobs(target, loaded, IDS, PATHS)
    if dtype == torch.float32:
        assert torch.equal(got, want)  # the very same draft
    else:
        kept = torch.isfinite(want)
        assert torch.equal(kept, torch.isfinite(got))
        assert torch.allclose(got[kept], want[kept], atol=0.05)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_export_modes_follow_the_umask(target, tmp_path, umask):
    """The folder and its files get what mkdir and open give under the umask (0755 / 0644 under
    022): a serving engine running as another user can read them, also after a re-export."""
    draft = make_draft(target)
    src = _saved(draft, tmp_path)
    out = tmp_path / "export"
    old = os.umask(umask)
    try:
        for _ in range(2):  # a first export, then one replacing it
            assert export_main([src, "--out", str(out)]) == 0
            assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, oct(out.stat().st_mode)
            for name in ("config.json", "model.safetensors"):
                mode = stat.S_IMODE((out / name).stat().st_mode)
                assert mode == 0o666 & ~umask, (name, oct(mode))
    finally:
        os.umask(old)


def test_load_without_target_reads_a_checkpoint(target, tmp_path):
    """train.py's --resume reads a checkpoint without the target: the file has no embeddings."""
    draft = make_draft(target)
    draft.save(tmp_path / "ckpt")
    loaded = Eagle3Draft.load(tmp_path / "ckpt")
    for k, v in draft.trained_state().items():
        assert torch.equal(loaded.trained_state()[k], v), k


def test_sglang_style_config_loads(target, tmp_path):
    """A config with only SGLang's (output-of-layer) ids gives the same feature layers."""
    draft = make_draft(target)
    assert export_main([_saved(draft, tmp_path), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    del config["eagle_aux_hidden_state_layer_ids"]
    assert DraftConfig.from_hf(config).feature_layers == draft.config.feature_layers


def test_a_config_without_feature_layers_loads_with_a_warning_naming_the_assumption(target, tmp_path, capsys):
    """A folder that records no feature layers (an engine's own export, say) is not silently read
    with EAGLE-3's default layers: the warning names the layers assumed."""
    draft = make_draft(target)
    assert export_main([_saved(draft, tmp_path), "--out", str(tmp_path / "out")]) == 0
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    del config["eagle_aux_hidden_state_layer_ids"], config["eagle_config"]
    config_path.write_text(json.dumps(config))
    capsys.readouterr()
    loaded = Eagle3Draft.load(tmp_path / "out", target)
    err = capsys.readouterr().err
    assert "names no feature layers" in err and str(loaded.config.feature_layers) in err
    with pytest.raises(ValueError, match="no feature layers and no target"):
        Eagle3Draft.load(tmp_path / "out")


def _saved(draft, tmp_path):
    draft.save(tmp_path / "draft")
    return str(tmp_path / "draft")


def _error(capsys, argv) -> str:
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("torchspec_ext.export: error:")
    return err


def test_export_errors(target, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "does not exist" in _error(capsys, [str(tmp_path / "missing"), "--out", out])
    (tmp_path / "empty").mkdir()
    assert "is not a draft" in _error(capsys, [str(tmp_path / "empty"), "--out", out])
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000009")
    assert "step-00000009" in _error(capsys, [str(tmp_path / "run"), "--out", out])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"nothing")
    assert "not a readable draft" in _error(capsys, [str(bad), "--out", out])
    src = _saved(make_draft(target), tmp_path)
    assert "is the source itself" in _error(capsys, [src, "--out", src])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert "refusing to replace" in _error(capsys, [src, "--out", str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: bad --dtype
        export_main([src, "--out", out, "--dtype", "int8"])
    assert exc.value.code == 2


def test_eagle3_drafter_decoding_is_lossless(target, tmp_path):
    """Greedy speculative decoding with a (random) EAGLE-3 draft, loaded as eval --draft DIR does,
    is the target's greedy decoding token for token."""
    from torchspec_ext.eval import load_draft

    make_draft(target).save(tmp_path / "draft")
    assert export_main([str(tmp_path / "draft"), "--out", str(tmp_path / "export")]) == 0
    prompt = [5, 17, 42, 99, 123, 7]
    with torch.no_grad():
        want = target.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    for directory, spec in (("draft", TreeSpec(depth=3, topk=2, max_nodes=6)), ("export", TreeSpec.chain(3))):
        family, draft = load_draft(str(tmp_path / directory), target)
        assert isinstance(draft, Eagle3Draft) and family.name == "eagle3"
        result = speculative_generate(target, family.proposer(draft, spec), prompt, 24)
        assert result.tokens == want
        assert result.target_forwards <= len(want)


def test_eval_rejects_a_directory_that_is_not_a_draft(target, tmp_path):
    from torchspec_ext.eval import load_draft

    with pytest.raises(SystemExit, match=f"cannot load draft '{tmp_path}': not a draft directory"):
        load_draft(str(tmp_path), target)
    other = Eagle3Draft(
        DraftConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=VOCAB,
            draft_vocab_size=10,
            feature_layers=[1, 2, 3],
        )
    )
    other.save(tmp_path / "other")
    with pytest.raises(SystemExit, match="made for another target"):
        load_draft(str(tmp_path / "other"), target)
