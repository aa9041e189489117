"""The DFlash and DSpark draft families (the registry's interface): a new draft shaped like and
initialised from the target, its mask token, loading a saved or exported draft, the proposers and the
decoding modes an evaluation measures, and what export checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from torchspec_ext.drafts.base import WEIGHTS_NAME, DraftFamily, load_weights
from torchspec_ext.drafts.dflash.config import DFLASH_ARCHITECTURE, DSPARK_ARCHITECTURE, DFlashConfig
from torchspec_ext.drafts.dflash.drafter import ConfidenceChain, ConfidenceSpec, DFlashDrafter
from torchspec_ext.drafts.dflash.model import DFlashDraft
from torchspec_ext.drafts.dflash.options import DFlashOptions, DSparkOptions
from torchspec_ext.speculate import TreeProposer, TreeSpec, with_pruned

# A proposal as long as the draft's block allows (a chain's depth; the proposer caps it at the block).
WHOLE_BLOCK = 64


def choose_mask_token(target) -> int:
    """The mask token of a target (``--mask-token-id`` unset): its tokenizer's mask token; else the first
    embedding row past the tokenizer's vocabulary (an unused slot, as z-lab's Qwen3 drafts use); else
    the tokenizer's highest added special token that is not its bos, eos, pad or unk token (for
    SmolLM2, ``<empty_output>``, id 16: a code-data marker that chat data never holds)."""
    from transformers import AutoTokenizer

    vocab = target.config.vocab_size
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.name_or_path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"no tokenizer beside the target ({exc.__class__.__name__}) to choose the mask token from: give "
            "--mask-token-id (a token id that the data never holds)"
        ) from None
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < vocab:
        return int(tokenizer.mask_token_id)
    if len(tokenizer) < vocab:
        return len(tokenizer)
    special = {getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
    candidates = [i for i in tokenizer.added_tokens_decoder if i not in special and i < vocab]
    if not candidates:
        raise ValueError("the target's tokenizer has no spare special token for the mask: give --mask-token-id")
    return max(candidates)


def load_block_draft(directory: Path, target, family: type[DraftFamily]) -> DFlashDraft:
    """A draft of ``family`` saved by training or export, with the ``training`` it recorded; the
    embedding and LM head from ``target`` (without one they stay zero: enough to read or re-export the
    trained weights, not to draft)."""
    from safetensors.torch import load_file

    from torchspec_ext.drafts import read_family_config

    directory = Path(directory)
    raw, config = read_family_config(directory, family, DFlashConfig.from_hf)
    draft = DFlashDraft(config)
    state = load_file(str(directory / WEIGHTS_NAME))
    frozen = ["embed_tokens.weight", "lm_head.weight"]
    if target is not None:
        state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().float().cpu()
        state["lm_head.weight"] = target.get_output_embeddings().weight.detach().float().cpu()
    else:
        for name in frozen:
            draft.get_parameter(name).data.zero_()
    load_weights(draft, directory, state, frozen, family.title)
    draft.metadata = raw.get("training") or {}
    return draft


def fit_to_block(spec: TreeSpec, proposals: int) -> TreeSpec:
    """``spec`` no deeper than the ``proposals`` tokens of a block, nor with more nodes than that many levels hold."""
    return replace(spec, depth=min(spec.depth, proposals), max_nodes=min(spec.max_nodes, proposals * max(1, spec.topk)))


class _BlockFamily(DraftFamily):
    """What DFlash and DSpark share; each is its own family (a folder of one does not load as the other)."""

    dspark: bool

    def new_draft(self, target, token_sample: Sequence[tuple[Tensor, Tensor]], options) -> DFlashDraft:
        """A draft shaped like the target's layers, ``options.draft_layers`` deep, reading as many
        target layers (the published choice), initialised from the target."""
        problems = options.problems(self.title)
        if problems:
            raise ValueError("; ".join(problems))
        vocab, layers = target.config.vocab_size, target.config.num_hidden_layers
        mask = options.mask_token_id if options.mask_token_id is not None else choose_mask_token(target)
        if not 0 <= mask < vocab:
            raise ValueError(f"--mask-token-id {mask} is not a token of the target (0 to {vocab - 1})")
        if options.draft_layers > layers:
            raise ValueError(f"--draft-layers {options.draft_layers}: the target has {layers} layers")
        draft = DFlashDraft(DFlashConfig.from_target(target.config, options, mask, self.dspark))
        draft.init_from_target(target, copy_layers=options.draft_init == "target")
        return draft

    def config_from(self, config: dict) -> DFlashConfig:
        return DFlashConfig.from_hf(config)

    def load(self, directory: Path, target=None) -> DFlashDraft:
        return load_block_draft(directory, target, type(self))

    def fit_modes(self, draft: DFlashDraft, modes: dict[str, TreeSpec]) -> dict[str, TreeSpec]:
        """Each mode's depth capped at the tokens a block proposes (and its nodes at that many levels)."""
        return {name: fit_to_block(spec, draft.config.proposals) for name, spec in modes.items()}

    def proposer(self, draft: DFlashDraft, spec: TreeSpec):
        """One block forward per proposal; ``spec``'s depth capped at the block's proposals."""
        spec = fit_to_block(spec, draft.config.proposals)
        drafter = DFlashDrafter(draft)
        if isinstance(spec, ConfidenceSpec):
            return ConfidenceChain(drafter, spec)
        return TreeProposer(drafter, spec)

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        """The whole block as a chain (the published verification); a tree of the ``topk`` best tokens
        of each slot (``max_nodes`` nodes); and with ``min_prob`` > 0 each cut below that cumulative
        draft probability. ``depth`` is not used: a block proposes what it holds."""
        modes = {"block": TreeSpec.chain(WHOLE_BLOCK)}
        if topk > 1:
            modes["tree"] = TreeSpec(WHOLE_BLOCK, topk, max_nodes)
        return with_pruned(modes, min_prob)

    def export_problems(self, draft: DFlashDraft) -> tuple[list[str], list[str]]:
        c, errors, warnings = draft.config, [], []
        if not 0 <= c.mask_token_id < c.vocab_size:
            errors.append(f"mask token {c.mask_token_id} is outside the vocabulary of {c.vocab_size}")
        odd = [i for i in c.feature_layers if i < 1 or (c.target_num_layers and i >= c.target_num_layers)]
        if odd:
            warnings.append(
                f"feature layers {odd} are the target's embeddings or its final (normed) hidden state; SGLang and "
                "vLLM capture the outputs of layers 0..L-2 (dflash_config.target_layer_ids), so they will not feed "
                "this draft what it was trained on"
            )
        return errors, warnings


class DFlashFamily(_BlockFamily):
    name = "dflash"
    title = "DFlash"
    architectures = (DFLASH_ARCHITECTURE,)
    Options = DFlashOptions
    dspark = False


class DSparkFamily(_BlockFamily):
    name = "dspark"
    title = "DSpark"
    architectures = (DSPARK_ARCHITECTURE,)
    Options = DSparkOptions
    dspark = True

    def decode_modes(self, depth: int, topk: int, max_nodes: int, min_prob: float) -> dict[str, TreeSpec]:
        """DFlash's modes, and the block cut by the confidence head where its cumulative probability of
        acceptance falls below ``min_prob`` (0.5 when ``min_prob`` is 0)."""
        modes = super().decode_modes(depth, topk, max_nodes, min_prob)
        cut = min_prob if min_prob > 0 else 0.5
        return {"block": modes.pop("block"), f"block, confidence >= {cut:g}": ConfidenceSpec(
            WHOLE_BLOCK, 1, WHOLE_BLOCK, 0.0, cut)} | modes  # fmt: skip
