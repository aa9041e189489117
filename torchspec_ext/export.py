"""``python -m torchspec_ext.export SRC --out DIR``: a trained draft as an EAGLE-3 checkpoint.

SRC is a training output directory (its newest checkpoint, ``checkpoints/latest``, else its
final ``draft/``), one checkpoint directory (``checkpoints/step-N``) or a draft directory.
DIR receives ``config.json`` (architecture ``LlamaForCausalLMEagle3``) and
``model.safetensors`` (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t`` int64, ``t2d``
bool), which SGLang and vLLM load as is next to the target model; the draft has no tokenizer
or embedding of its own (both are the target's). DIR is written whole or not at all, readable
as any model folder (0755 / 0644 under the usual umask 022).

The weights are bfloat16 by default, the dtype targets are served in: SGLang's ``--dtype auto``
reads the draft's own dtype and serves a float32 draft in float16, which then meets a bfloat16
target's hidden states ("mat1 and mat2 must have the same dtype"). ``--dtype float32`` keeps
the trained weights exactly; ``--dtype float16`` is for a float16 target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from torchspec_ext import atomic
from torchspec_ext.draft import CONFIG_NAME, WEIGHTS_NAME, Eagle3Draft
from torchspec_ext.training.checkpoints import CHECKPOINTS, FINAL_DRAFT, LATEST

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = "bfloat16"


class ExportError(Exception):
    pass


def _is_draft_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _is_earlier_export(path: Path) -> bool:
    """Only what :func:`export` writes: config.json (without this package's private copy) and weights."""
    if not _is_draft_dir(path) or {p.name for p in path.iterdir()} != {CONFIG_NAME, WEIGHTS_NAME}:
        return False
    try:
        return "torchspec_ext" not in json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False


def resolve_source(src: Path) -> Path:
    """The draft directory that ``src`` names (see the module docstring)."""
    if not src.exists():
        raise ExportError(f"{src} does not exist")
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory")
    pointer = src / CHECKPOINTS / LATEST
    if pointer.is_file():
        checkpoint = src / CHECKPOINTS / pointer.read_text().strip()
        if not _is_draft_dir(checkpoint):
            raise ExportError(f"{pointer} names {checkpoint}, which holds no draft ({CONFIG_NAME} and {WEIGHTS_NAME})")
        return checkpoint
    if _is_draft_dir(src / FINAL_DRAFT):
        return src / FINAL_DRAFT
    if _is_draft_dir(src):
        return src
    raise ExportError(
        f"{src} is not a draft, a checkpoint or a training output directory "
        f"(no {CONFIG_NAME} + {WEIGHTS_NAME}, {CHECKPOINTS}/{LATEST} or {FINAL_DRAFT}/)"
    )


def load_source(draft_dir: Path) -> Eagle3Draft:
    try:
        draft = Eagle3Draft.load(draft_dir)
    except Exception as exc:  # unreadable json or safetensors, missing fields, wrong shapes
        raise ExportError(f"{draft_dir} is not a readable EAGLE-3 draft: {exc}") from None
    c = draft.config
    if len(c.feature_layers) != 3:
        raise ExportError(
            f"{draft_dir}: the draft fuses {len(c.feature_layers)} target layers; "
            "SGLang and vLLM's EAGLE-3 fuse exactly 3"
        )
    ids = draft.draft_to_target()
    if ids.min() < 0 or ids.max() >= c.vocab_size or len(ids.unique()) != len(ids):
        raise ExportError(f"{draft_dir}: d2t does not map the draft vocabulary onto distinct target ids")
    return draft


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _make_readable(directory: Path) -> None:
    """Gives ``directory`` and its files the modes ``mkdir`` and ``open`` give them under the
    umask (safetensors writes its file 0600)."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)


def export(src: Path, out: Path, dtype: str = DEFAULT_DTYPE) -> tuple[str, str | None]:
    """Writes the EAGLE-3 checkpoint of ``src`` to ``out``; returns a one-line summary and a
    warning (or None)."""
    draft_dir = resolve_source(src)
    draft = load_source(draft_dir)
    if out.resolve() in (src.resolve(), draft_dir.resolve()):
        raise ExportError(f"--out {out} is the source itself; export to another directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_earlier_export(out))):
        raise ExportError(
            f"--out {out} exists and is not an empty directory or an earlier export; refusing to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    draft.set_vocab(draft.draft_to_target())  # t2d rebuilt from d2t, so the two always agree
    with atomic.staged(out) as staging:
        draft.save(staging, DTYPES[dtype], private=False)
        _make_readable(staging)
    c = draft.config
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 2**20
    summary = (
        f"exported {draft_dir} -> {out}: LlamaForCausalLMEagle3, hidden {c.hidden_size}, draft vocab "
        f"{c.draft_vocab_size}/{c.vocab_size}, aux layers {list(c.feature_layers)} (vLLM; SGLang "
        f"{[i - 1 for i in c.feature_layers]}), {dtype}, {size_mb:.1f} MiB"
    )
    return summary, layer_warning(draft)


def layer_warning(draft: Eagle3Draft) -> str | None:
    """Feature layers that SGLang / vLLM do not capture as the training did, if any."""
    c = draft.config
    odd = [i for i in c.feature_layers if i < 1 or (c.target_num_layers and i >= c.target_num_layers)]
    if not odd:
        return None
    return (
        f"warning: feature layers {odd} are the target's embeddings or its final (normed) hidden state; "
        "SGLang and vLLM capture the inputs of decoder layers 1..L-1 only, so they will not feed this draft "
        "what it was trained on"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchspec_ext.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a training output directory, a checkpoint directory or a draft directory")
    parser.add_argument("--out", required=True, help="the directory to write (replaced if it is an earlier export)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=DEFAULT_DTYPE,
        help="of the floating-point weights (default: %(default)s, as engines serve drafts; "
        "float32 keeps the trained weights exactly)",
    )
    args = parser.parse_args(argv)
    try:
        summary, warning = export(Path(args.src), Path(args.out), args.dtype)
    except ExportError as exc:
        print(f"torchspec_ext.export: error: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(f"torchspec_ext.export: {warning}", file=sys.stderr)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
