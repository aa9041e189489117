"""DFlash (block-parallel drafting) and DSpark (DFlash + a previous-token logit bias + a confidence head).

A DFlash draft is a small stack of Qwen3-style decoder layers (per-head ``q_norm`` / ``k_norm``) run
over a *block* of ``B`` positions: the anchor token (the last committed token, whose target features
do not exist yet), then ``B - 1`` copies of a mask token, at rotary positions ``anchor .. anchor + B
- 1``. Inside the block the attention has no causal mask; every layer also attends to keys and values
projected from the target's features at the positions strictly before the anchor (several target
layers concatenated, ``fc`` then ``hidden_norm``, shared by all layers). The target's embedding and
LM head are the draft's, frozen. Slot ``k`` of the block predicts the token at ``anchor + k``: one
draft forward proposes ``B - 1`` tokens (arXiv 2602.06036; z-lab/dflash; SpecForge's ``dflash.py``).

DSpark (arXiv 2607.05147; SpecForge's ``dspark.py``) trains every slot, the anchor's included: slot
``k`` predicts ``anchor + k + 1`` (``sample_from_anchor``), so a forward proposes ``B`` tokens. Its
low-rank Markov head adds ``markov_w2(markov_w1[previous token])`` to slot ``k``'s logits (the token
before the predicted one: the anchor's for slot 0, then the path's own), and its confidence head
``proj([hidden, markov_w1[previous]])`` predicts the probability that the slot is accepted, so a
proposal can stop where acceptance is unlikely.

Training: random anchors inside the reply spans, one block per anchor, all blocks of a row against
the row's context in one pass (the context mask, key ``< anchor``, is built once per batch and shared
by the layers; the block part of the attention is ``[B, B]`` per block). Decoding: one block forward
per proposal, the context's keys and values kept per layer in buffers that grow with the committed
tokens (:class:`DFlashDrafter`).

Checkpoints are the layout SGLang, vLLM and z-lab's ``DFlashDraftModel`` load (``layers.*``, ``fc``,
``hidden_norm``, ``norm``; ``dflash_config.target_layer_ids`` counted as SGLang counts, our feature
layers minus one), which speculators' DFlash converter also reads; DSpark adds SpecForge's
``markov_head.markov_w{1,2}`` and ``confidence_head.proj``.

Modules: ``options`` (the families' training options), ``config`` (the draft's shape and config.json),
``model`` (the network), ``objective`` and ``loss_parts`` (training), ``drafter`` (decoding),
``family`` (the registry's interface: new drafts, loading, proposers, export checks).
"""

from torchspec_ext.drafts.dflash.config import DFLASH_ARCHITECTURE, DSPARK_ARCHITECTURE, DFlashConfig
from torchspec_ext.drafts.dflash.drafter import ConfidenceChain, ConfidenceSpec, DFlashDrafter
from torchspec_ext.drafts.dflash.family import DFlashFamily, DSparkFamily
from torchspec_ext.drafts.dflash.model import DFlashDraft
from torchspec_ext.drafts.dflash.options import DFlashOptions, DSparkOptions

__all__ = [
    "DFLASH_ARCHITECTURE",
    "DSPARK_ARCHITECTURE",
    "ConfidenceChain",
    "ConfidenceSpec",
    "DFlashConfig",
    "DFlashDraft",
    "DFlashDrafter",
    "DFlashFamily",
    "DFlashOptions",
    "DSparkFamily",
    "DSparkOptions",
]
