"""The training options of the DFlash and DSpark families (what ``--draft-family dflash`` / ``dspark``
add to ``train``'s command line)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torchspec_ext.options import at_least, option, positive

DATA_TOKEN_LOSSES = ("ce", "dpace")  # read only the data's tokens, never the teacher's top-k
BLOCK_LOSSES = (*DATA_TOKEN_LOSSES, "teacher")
DSPARK_LOSSES = ("dspark", "teacher")
INITS = ("target", "random")


def _block_size_check(v) -> str | None:
    return None if v is None or v >= 2 else "must be >= 2 (the anchor and at least one predicted token)"


@dataclass(frozen=True)
class DFlashOptions:
    """DFlash's training options (DSpark's add to them)."""

    block_size: int = option(
        16, "positions per draft block: the anchor, then block-size - 1 mask tokens", check=_block_size_check
    )
    draft_layers: int = option(
        5, "decoder layers of the draft (and target layers it reads, as published)", check=at_least(1)
    )
    num_anchors: int | None = option(
        None, "blocks trained per conversation, at random reply positions (default: 16 on CPU, 512 on GPU)",
        check=at_least(1),
    )  # fmt: skip
    block_loss: str | None = option(
        None,
        "DFlash: dpace (default), cross-entropy on the data's tokens weighted by D-PACE (arXiv 2605.18810); ce, the "
        "same with the published position decay (DFlash's loss); teacher, the run's --loss against the teacher's "
        "top-k at each slot, with the position decay. DSpark: dspark (default), 0.1 cross-entropy + 0.9 L1 distance "
        "to the teacher's distribution (its top-k and tail) + the confidence head's BCE (DSpark's loss); teacher, "
        "the run's --loss against the teacher's top-k + the BCE",
        choices=BLOCK_LOSSES + DSPARK_LOSSES[:1],
    )
    loss_decay_gamma: float = option(
        7.0, "slot k's loss weighs exp(-(k - 1) / gamma) (7: published for blocks of 16)", check=positive
    )
    dpace_alpha: float = option(0.5, "D-PACE's smoothing of the draft's probability (--block-loss dpace)")
    sliding_window: int | None = option(
        None, "the draft's layers attend to this many positions at most (default: the whole context, as published)",
        check=at_least(2),
    )  # fmt: skip
    mask_token_id: int | None = option(
        None,
        "the token the block's predicted slots hold (default: the tokenizer's mask token, else the first embedding "
        "row past the tokenizer's vocabulary, else its highest special token that is not bos, eos, pad or unk)",
        check=at_least(0),
    )
    draft_init: str = option(
        "target", "target: the draft's layers start as copies of the target's last layers; random: as published",
        choices=INITS,
    )  # fmt: skip

    DEFAULT_LOSS = "dpace"  # ahead of ce on every set at equal steps, two seeds (docs/dflash.md)
    LOSSES = BLOCK_LOSSES

    def resolved(self, on_gpu: bool):
        return replace(
            self,
            num_anchors=self.num_anchors or (512 if on_gpu else 16),
            block_loss=self.block_loss or self.DEFAULT_LOSS,
        )

    @property
    def reads_teacher_topk(self) -> bool:
        """Whether the loss reads the teacher's top-k."""
        return (self.block_loss or self.DEFAULT_LOSS) not in DATA_TOKEN_LOSSES

    def problems(self, title: str) -> list[str]:
        """What is wrong between the options (each a usage error)."""
        if self.block_loss is not None and self.block_loss not in self.LOSSES:
            return [f"--block-loss {self.block_loss} is not one of {title}'s: {', '.join(self.LOSSES)}"]
        return []


@dataclass(frozen=True)
class DSparkOptions(DFlashOptions):
    """DSpark's options: DFlash's, and its two heads."""

    DEFAULT_LOSS = "dspark"
    LOSSES = DSPARK_LOSSES

    markov_rank: int = option(256, "rank of the previous-token logit bias (0: none)", check=at_least(0))
