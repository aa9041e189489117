"""SpecForge EAGLE-3 and DFlash drafts converted to this package's folder layout, so that ``eval`` measures them
with the same decoder as ours; refused, with the reason, where ours cannot run one identically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURE = "LlamaForCausalLMEagle3"


class ConversionError(ValueError):
    """A SpecForge draft that this package's EAGLE-3 draft cannot represent (the message says why)."""


def specforge_rope_theta(config: dict) -> float:
    """The rotary base SpecForge's draft runs with (``get_rope_config``: transformers 5's
    ``rope_parameters``, else 4's ``rope_theta``, else 10000)."""
    rope = config.get("rope_parameters")
    if rope is not None:
        return float(rope["rope_theta"])
    return float(config.get("rope_theta", 10000))


def conversion_problems(config: dict) -> list[str]:
    """What in a SpecForge EAGLE-3 draft's config.json this package's draft cannot run the same way."""
    problems = []
    if ARCHITECTURE not in (config.get("architectures") or []):
        problems.append(f"architectures is {config.get('architectures')}, not [{ARCHITECTURE!r}]")
    if config.get("num_hidden_layers", 1) != 1:
        problems.append(f"{config['num_hidden_layers']} decoder layers; ours has one (EAGLE-3's midlayer)")
    if config.get("fc_norm"):
        problems.append("fc_norm: RMS norms on the three fused features before fc, which ours does not have")
    if not config.get("norm_output", True):
        problems.append("norm_output false: logits from the un-normed hidden state; ours always norms it")
    hidden = config.get("hidden_size")
    if config.get("target_hidden_size", hidden) != hidden:
        problems.append(
            f"target_hidden_size {config.get('target_hidden_size')} differs from hidden_size {hidden}; ours fuses "
            "features of the draft's own width"
        )
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r}; ours is SiLU")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag}: ours has no biases")
    if config.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {config['pretraining_tp']}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        problems.append(f"rope scaling {kind!r}; ours rotates with a plain rotary base")
    return problems


def convert_specforge_draft(
    source: Path,
    destination: Path,
    capture_layers: list[int] | None = None,
    metadata: dict | None = None,
    target_num_layers: int = 0,
) -> Path:
    """A SpecForge EAGLE-3 draft folder (``save_pretrained``'s config.json and model.safetensors)
    written as this package's EAGLE-3 draft folder, which ``eval`` loads.

    The two drafts are the same network (one Llama decoder layer over [normed embedding, normed
    fused features], its own hidden state fed back in training-time test, a norm and a reduced
    LM head) with the same tensor names and the same vocabulary maps (``d2t[i]`` = target id of
    draft id ``i`` minus ``i``; ``t2d`` the kept target ids); what differs is the config: the
    feature layers (SpecForge's capture layers count decoder outputs, SGLang's way: ours are one
    higher) and the rotary base's field. ``capture_layers``: the layers the draft was trained on
    (SGLang's count), needed when its config does not name them. Raises ConversionError for a
    draft ours cannot run identically (:func:`conversion_problems`)."""
    from safetensors.torch import load_file

    from torchspec_ext.drafts.eagle3 import DraftConfig, Eagle3Draft

    config = json.loads((source / "config.json").read_text())
    problems = conversion_problems(config)
    if problems:
        raise ConversionError(f"{source}: this SpecForge draft cannot be run as ours: " + "; ".join(problems))
    named = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    layers = list(named) if named else (list(capture_layers) if capture_layers else None)
    if not layers or len(layers) != 3:
        raise ConversionError(
            f"{source}: the three capture layers the draft was trained on are unknown (its config names none): "
            "pass capture_layers"
        )
    heads = config["num_attention_heads"]
    draft_config = DraftConfig(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        draft_vocab_size=config["draft_vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=specforge_rope_theta(config),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        feature_layers=[i + 1 for i in layers],
        target_num_layers=target_num_layers,
    )
    state = load_file(str(source / "model.safetensors"))
    state.pop("embed_tokens.weight", None)  # the target's, frozen: ours takes it from the target
    draft = Eagle3Draft(draft_config)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embed_tokens.weight"}:
        raise ConversionError(
            f"{source}: tensors do not match an EAGLE-3 draft (missing {missing}, unexpected {unexpected})"
        )
    t2d = draft.t2d.clone()
    draft.set_vocab(draft.draft_to_target())
    if not torch.equal(t2d, draft.t2d):
        raise ConversionError(f"{source}: its t2d does not mark the target ids its d2t maps to")
    draft.metadata = dict(metadata or {})
    draft.save(destination)
    return destination


def convert_specforge_dflash(
    source: Path, destination: Path, metadata: dict | None = None, target_num_layers: int = 0
) -> Path:
    """A SpecForge DFlash draft folder (``save_pretrained``'s config.json and model.safetensors) written
    as this package's DFlash draft folder, which ``eval`` loads.

    SpecForge's ``DFlashDraftModel`` is z-lab's network, which ours is too: our DFlash loader reads its
    folder as it is (the same tensor names; ``dflash_config``'s capture layers and mask token,
    ``block_size``, ``layer_types``), without the target's embedding and LM head, which ours take from
    the target. Raises ConversionError for a draft of SpecForge's DFlash variants that ours does not
    run (a projector, a shifted label, a pure-draft prefix), or one our loader refuses."""
    from torchspec_ext import drafts

    config = json.loads((source / "config.json").read_text())
    method = config.get("dflash_config") or {}
    problems = [
        f"dflash_config.{key} = {method[key]!r}, which ours does not have"
        for key in ("projector_type", "shift_label", "pure_draft_prefix_len")
        if method.get(key)
    ]
    if problems:
        raise ConversionError(f"{source}: this SpecForge draft cannot be run as ours: " + "; ".join(problems))
    try:
        draft = drafts.family("dflash").load(source)
    except drafts.DraftLoadError as exc:
        raise ConversionError(str(exc)) from None
    draft.config.target_num_layers = draft.config.target_num_layers or target_num_layers
    draft.metadata = dict(metadata or {})
    draft.save(destination)
    return destination
