"""SpecForge's training recipes (EAGLE-3 and DFlash), driven in this process for ``bench peers-train``
(its drafts are converted to this package's layout by :mod:`torchspec_ext.bench.specforge_convert`).

SpecForge 0.2.0 runs its target in SGLang only: on one machine it captures offline records (the
target's hidden states at its capture layers, and for EAGLE-3 its final normed hidden state, per
conversation) and trains on them (``specforge train`` in offline mode). Here the capture is the
same in-process transformers forward that our teacher runs, written in SpecForge's offline record
layout, and every step goes through SpecForge's own code: its draft config, draft model, training
model and target head (``build_model_bundle``), its offline normaliser and collator, its step
strategy, ``TrainerCore`` and its optimiser (``BF16Optimizer``, cosine schedule). What had to change
to run it on a CPU, and why, is in docs/benchmarks.md (``peers-train``) and in :func:`cpu_adapted`.

Nothing here imports SpecForge at module import: :func:`specforge_problem` says whether it can run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import torch

from torchspec_ext.bench.specforge_convert import convert_specforge_dflash, convert_specforge_draft
from torchspec_ext.data import tokenize_conversation

SPECFORGE_VERSION = "0.2.0"
# SpecForge pins torch 2.11, transformers 5.8.1 and sglang 0.5.14; its EAGLE-3 path needs none of
# sglang and runs on our torch and transformers, so it is installed without its dependencies.
INSTALL = f"pip install --no-deps specforge=={SPECFORGE_VERSION} && pip install 'torchspec_ext[peers]'"


def specforge_problem() -> str | None:
    """Why SpecForge's recipes cannot run here (None when they can), with the install line."""
    if importlib.util.find_spec("specforge") is None:
        return f"SpecForge is not installed: {INSTALL}"
    try:
        import specforge.algorithms.eagle3.model  # noqa: F401
        import specforge.data.utils  # noqa: F401  (its collator; needs `datasets`)
        import specforge.training.assembly  # noqa: F401
    except Exception as exc:  # a missing dependency, or a version whose modules moved
        lines = str(exc).strip().splitlines()
        return f"SpecForge does not import here ({type(exc).__name__}: {lines[0] if lines else ''}): {INSTALL}"
    return None


def specforge_version() -> str:
    try:
        return importlib.metadata.version("specforge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_dtype() -> str:
    """SpecForge's own dtype, bfloat16, where this CPU multiplies bfloat16 natively (oneDNN: AVX512-BF16 or
    AMX); float32 elsewhere, as a user of such a CPU would choose: there torch's bfloat16 matmul falls back
    to a scalar loop, tens of times slower than float32's."""
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


@contextlib.contextmanager
def cpu_adapted():
    """What SpecForge needs to run on a CPU, for the duration of the block: ``torch.compile`` off
    (SpecForge compiles its norms, rotary embedding and target softmax with inductor; on a CPU that
    is minutes of C++ compilation a shape, and flex attention, its default, needs it), and its KL
    loss's reference implementation (``specforge.core.loss._compute_loss``, the same value and
    gradient) in place of the Triton kernel ``LogSoftmaxLoss``, which needs a GPU."""
    import specforge.algorithms.eagle3.model as eagle3_model
    from specforge.core.loss import _compute_loss

    class ReferenceLoss:  # LogSoftmaxLoss's interface: apply(logits, target_p, position_mask) -> scalar
        @staticmethod
        def apply(logits, target_p, position_mask):
            return _compute_loss(logits, target_p, position_mask)

    kernel, disabled = eagle3_model.LogSoftmaxLoss, torch._dynamo.config.disable
    eagle3_model.LogSoftmaxLoss, torch._dynamo.config.disable = ReferenceLoss, True
    try:
        yield
    finally:
        eagle3_model.LogSoftmaxLoss, torch._dynamo.config.disable = kernel, disabled


def write_target_dir(target, directory: Path) -> Path:
    """The target as SpecForge reads it from a model directory: ``config.json`` and an index of
    safetensors shards holding the input embedding (``model.embed_tokens.weight``, its draft's
    frozen embedding) and the LM head (``lm_head.weight``, its ``TargetHead``; a target with tied
    embeddings has no such key, so the tied weight is written under it). SpecForge reads nothing
    else from the target: the forward is ours."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = target.config.to_dict()
    config.pop("quantization_config", None)  # the default target comes from a GGUF file
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    shard = "embedding_and_head.safetensors"
    tensors = {
        "model.embed_tokens.weight": target.get_input_embeddings().weight.detach().float().contiguous().clone(),
        "lm_head.weight": target.get_output_embeddings().weight.detach().float().contiguous().clone(),
    }
    save_file(tensors, str(directory / shard))
    index = {"metadata": {}, "weight_map": {name: shard for name in tensors}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


class SpecForgeRecipe:
    """One of SpecForge's recipes on the harness's target and token batches (a subclass per algorithm).

    ``make_batch(j)`` captures token batch ``j`` (one forward of the padded batch, as our teacher
    runs it) into SpecForge offline records, one per conversation cut to its own length, and makes
    SpecForge's training batch of them with its offline normaliser and collator. ``trainer(steps,
    lr)`` is a fresh draft and optimiser with SpecForge's defaults and a cosine schedule over
    ``steps``. Only what the harness must set is set: the target directory, the offline mode (the
    records), ``max_length`` (ours, so both see the same tokens), ``attention_backend = sdpa``
    (flex attention needs torch.compile), the schedule's length, the learning rate and the seed,
    and what a subclass's :meth:`settings` add."""

    name: str
    strategy: str  # SpecForge's training.strategy

    def __init__(self, target, tokenizer, batches, workdir: Path, seed: int, dtype: str):
        from specforge.config.schema import TrainingConfig
        from specforge.training.model_loading import resolve_draft_config

        self.target, self.tokenizer, self.batches, self.seed = target, tokenizer, batches, seed
        self.dtype_name = dtype
        self.target_dir = write_target_dir(target, workdir / "specforge-target")
        self.workdir = workdir
        self.registration = self.create_registration()
        self.default_lr = TrainingConfig().learning_rate
        config = self.config(total_steps=1, lr=self.default_lr)
        self.training = config.training  # its training settings at its defaults, for what reads them
        model_provider = self.registration.providers.model
        self.draft_config = resolve_draft_config(config, provider=model_provider.draft_config)
        self.capture_layers = list(model_provider.resolve_capture_layers(config, self.draft_config, target.config))
        self.dtype = getattr(torch, config.model.torch_dtype)
        offline = self.registration.providers.offline_for("text")
        self.normalize = offline.build_normalizer(batches.max_length, **self.normalizer_options())
        self.collate = offline.build_collator()

    def create_registration(self):
        raise NotImplementedError

    def settings(self) -> dict:
        """Config sections ({"model": {...}, "training": {...}}) this algorithm's recipe adds."""
        return {}

    def normalizer_options(self) -> dict:
        return {}

    def config(self, total_steps: int, lr: float):
        from specforge.config.schema import Config

        extra = self.settings()
        return Config(
            model={"target_model_path": str(self.target_dir), "torch_dtype": self.dtype_name} | extra.get("model", {}),
            # Offline mode: its trainer reads records from this directory; the harness hands them
            # over in memory instead, so the directory is never read.
            data={"hidden_states_path": str(self.workdir / "records"), "max_length": self.batches.max_length},
            training={
                "strategy": self.strategy,
                "attention_backend": "sdpa",
                "total_steps": total_steps,
                "learning_rate": lr,
                "seed": self.seed,
            }
            | extra.get("training", {}),
            output_dir=str(self.workdir / "output"),
        )

    def describe(self) -> dict:
        """SpecForge's settings that this recipe runs with (its defaults but for the harness's)."""
        t = self.training
        return {
            "specforge": specforge_version(),
            "strategy": self.strategy,
            "dtype": str(self.dtype).removeprefix("torch."),
            "default_lr": t.learning_rate,
            "warmup_ratio": t.warmup_ratio,
            "max_grad_norm": t.max_grad_norm,
            "lr_scheduler": t.lr_scheduler,
            "capture_layers (SGLang's count)": self.capture_layers,
        }

    def record(self, row_ids, mask, out, aux, row: int) -> dict:
        """Conversation ``row``'s offline record from the batch's forward ``out`` (``aux``: the
        capture layers' hidden states side by side)."""
        raise NotImplementedError

    def batch_metadata(self) -> dict:
        return {}

    @torch.no_grad()
    def make_batch(self, j: int):
        from specforge.runtime.contracts import TrainBatch

        conversations = self.batches.conversations_of(j)
        pairs = [tokenize_conversation(self.tokenizer, c, self.batches.max_length) for c in conversations]
        _, ids, _ = self.batches.tokens(j)
        device = next(self.target.parameters()).device
        out = self.target.model(ids.to(device), output_hidden_states=True)
        # SGLang's layer i is the output of decoder layer i: transformers' hidden_states[i + 1].
        aux = torch.cat([out.hidden_states[i + 1] for i in self.capture_layers], -1)
        # SpecForge's preprocessing drops what its algorithm cannot train on (DFlash: a conversation
        # without two consecutive supervised tokens); a batch of nothing else is no step (None).
        usable = self.registration.providers.model.loss_mask_filter or (lambda mask: True)
        kept = [(row, ids_, mask) for row, (ids_, mask) in enumerate(pairs) if usable(mask.long())]
        if not kept:
            return None
        records = [self.normalize(self.record(ids_, mask, out, aux, row)) for row, ids_, mask in kept]
        return TrainBatch(
            sample_ids=[f"{j}/{row}" for row, _, _ in kept],
            strategy=self.strategy,
            tensors=self.collate(records),
            metadata=self.batch_metadata(),
        )

    def prepare(self, bundle) -> None:
        """What the algorithm sets on a freshly built draft before training."""

    def trainer(self, total_steps: int, lr: float | None = None) -> SpecForgeTrainer:
        from specforge.training.assembly import _ConfiguredOptimizerFactory, build_model_bundle
        from specforge.training.backend import FSDPTrainingBackend, ParallelConfig
        from specforge.training.controller import TrainerCore

        lr = self.default_lr if lr is None else lr
        config = self.config(total_steps, lr)
        torch.manual_seed(self.seed)
        with cpu_adapted():
            bundle = build_model_bundle(config, algorithm=self.registration)
        self.prepare(bundle)
        # One process, no torch.distributed: the backend runs unwrapped (FSDP needs a process group).
        backend = FSDPTrainingBackend(
            ParallelConfig.from_distributed(), optimizer_factory=_ConfiguredOptimizerFactory(config)
        )
        wrapped = backend.prepare_model(bundle.model, wrap=False, optimizer_target=bundle.model.draft_model)
        strategy = self.registration.providers.step.build(
            wrapped, target_head=bundle.target_head, **dict(bundle.strategy_kwargs)
        )
        return SpecForgeTrainer(TrainerCore(strategy, backend), bundle.draft_model, self.convert, lr)

    def convert(self, saved: Path, directory: Path, metadata: dict | None, target_num_layers: int) -> Path:
        """SpecForge's ``save_pretrained`` folder ``saved`` as this package's draft folder ``directory``."""
        raise NotImplementedError


class SpecForgeEagle3(SpecForgeRecipe):
    """SpecForge's EAGLE-3 recipe: its vocabulary map counted over ``vocab_conversations``, records of
    the capture layers and the final normed hidden state (its target head makes the distribution)."""

    name, strategy = "specforge-eagle3", "eagle3"

    def __init__(self, target, tokenizer, batches, vocab_conversations, workdir: Path, seed: int, dtype: str):
        from specforge.data.preprocessing import process_token_dict_to_mappings

        super().__init__(target, tokenizer, batches, workdir, seed, dtype)
        # SpecForge's vocabulary map: the draft_vocab_size tokens most frequent among the loss-masked
        # tokens of its data (here the same conversations our draft's vocabulary is counted over).
        counts = Counter()
        for conversation in vocab_conversations:
            ids, mask = tokenize_conversation(tokenizer, conversation, batches.max_length)
            counts.update(ids[mask].tolist())
        vocab = int(self.draft_config.draft_vocab_size)
        self.d2t, self.t2d = process_token_dict_to_mappings(counts, vocab, target.config.vocab_size)

    def create_registration(self):
        from specforge.algorithms.eagle3.providers import create_registration

        return create_registration()

    def normalizer_options(self) -> dict:
        return {"ttt_length": self.training.ttt_length}

    def describe(self) -> dict:
        t = self.training
        return super().describe() | {"ttt_length": t.ttt_length, "draft_vocab": int(self.draft_config.draft_vocab_size)}

    def record(self, row_ids, mask, out, aux, row: int) -> dict:
        n = len(row_ids)
        return {
            "input_ids": row_ids,
            "loss_mask": mask.long(),
            # The target head's dtype (see prepare).
            "hidden_state": out.last_hidden_state[row : row + 1, :n].to(self.dtype).cpu(),
            "aux_hidden_state": aux[row : row + 1, :n].to(self.dtype).cpu(),
        }

    def batch_metadata(self) -> dict:
        return {"target_repr": "hidden_state", "ttt_length": self.training.ttt_length}

    def prepare(self, bundle) -> None:
        bundle.draft_model.d2t.copy_(self.d2t)
        bundle.draft_model.t2d.copy_(self.t2d)
        # TargetHead.from_pretrained always casts to bfloat16 (a GPU's choice); it runs in the draft's dtype.
        bundle.target_head.to(self.dtype)

    def convert(self, saved: Path, directory: Path, metadata: dict | None, target_num_layers: int) -> Path:
        return convert_specforge_draft(saved, directory, self.capture_layers, metadata, target_num_layers)


class SpecForgeDFlash(SpecForgeRecipe):
    """SpecForge's DFlash recipe at its defaults (a draft of one layer, blocks of 16, its hard-label loss
    without position decay) but for two settings it gets from ours, as both get the same batches:
    ``num_anchors``, the blocks trained per conversation (SpecForge's 512 is a GPU's choice, 32 times
    the blocks ours trains on a CPU), and ``mask_token_id``, our draft's mask
    token (SpecForge would fall back to the tokenizer's pad or eos token, which the data holds; the
    harness writes no tokenizer beside the target it hands SpecForge)."""

    name, strategy = "specforge-dflash", "dflash"

    def __init__(
        self, target, tokenizer, batches, mask_token_id: int, num_anchors: int, workdir: Path, seed: int, dtype: str
    ):
        self.mask_token_id, self.num_anchors = mask_token_id, num_anchors
        super().__init__(target, tokenizer, batches, workdir, seed, dtype)

    def create_registration(self):
        from specforge.algorithms.dflash.providers import create_registration

        return create_registration()

    def settings(self) -> dict:
        return {"model": {"mask_token_id": self.mask_token_id}, "training": {"num_anchors": self.num_anchors}}

    def describe(self) -> dict:
        t = self.training
        c = self.draft_config
        return super().describe() | {
            "draft_layers": int(c.num_hidden_layers), "block_size": int(c.block_size), "num_anchors": self.num_anchors,
            "loss_type": t.loss_type, "loss_decay_gamma": t.loss_decay_gamma, "mask_token_id": self.mask_token_id,
        }  # fmt: skip

    def record(self, row_ids, mask, out, aux, row: int) -> dict:
        n = len(row_ids)
        features = aux[row : row + 1, :n].to(self.dtype).cpu()
        return {"input_ids": row_ids, "loss_mask": mask.long(), "hidden_states": features}

    def convert(self, saved: Path, directory: Path, metadata: dict | None, target_num_layers: int) -> Path:
        return convert_specforge_dflash(saved, directory, metadata, target_num_layers)


class SpecForgeTrainer:
    """One SpecForge draft in training: ``step(batch)`` is its ``TrainerCore.train_step``."""

    def __init__(self, core, draft_model, convert, lr: float):
        self.core, self.draft_model, self.convert, self.lr = core, draft_model, convert, lr
        self.last_loss = math.nan

    def step(self, batch) -> float:
        """One training step on ``batch``; a batch SpecForge's preprocessing left empty (None) is none,
        and the last loss stands (NaN before the first)."""
        if batch is None:
            return self.last_loss
        with cpu_adapted():
            result = self.core.train_step(batch)
        if not math.isfinite(result.loss):
            raise FloatingPointError("SpecForge's loss is not finite")
        self.last_loss = result.loss
        return result.loss

    def export(self, directory: Path, metadata: dict | None = None, target_num_layers: int = 0) -> Path:
        """The draft as SpecForge exports it (``save_pretrained``: what SGLang loads), converted to
        this package's folder layout in ``directory``."""
        with tempfile.TemporaryDirectory(prefix="specforge-draft-") as saved:
            self.draft_model.save_pretrained(saved)
            return self.convert(Path(saved), directory, metadata, target_num_layers)
