"""``python -m torchspec_ext.export SRC --out DIR``: a trained draft in the layout serving engines load.

SRC is a training output directory (its newest checkpoint, ``checkpoints/latest``, else its
final ``draft/``), one checkpoint directory (``checkpoints/step-N``) or a draft directory, of any
draft family. DIR receives ``config.json`` and ``model.safetensors`` as the family's engines read
them (EAGLE-3: architecture ``LlamaForCausalLMEagle3``, tensors ``fc``, ``midlayer.*``, ``norm``,
``lm_head``, ``d2t`` int64, ``t2d`` bool, which SGLang and vLLM load as is next to the target
model); the draft has no tokenizer or embedding of its own (both are the target's). DIR is written
whole or not at all, readable as any model folder (0755 / 0644 under the usual umask 022).

The weights are bfloat16 by default, the dtype targets are served in: SGLang's ``--dtype auto``
reads the draft's own dtype and serves a float32 draft in float16, which then meets a bfloat16
target's hidden states ("mat1 and mat2 must have the same dtype"). ``--dtype float32`` keeps
the trained weights exactly; ``--dtype float16`` is for a float16 target.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from torchspec_ext import atomic, drafts
from torchspec_ext.drafts.base import CONFIG_NAME, WEIGHTS_NAME, DraftLoadError
from torchspec_ext.options import DTYPES, option, parse
from torchspec_ext.training.checkpoints import CHECKPOINTS, FINAL_DRAFT, LATEST

DEFAULT_DTYPE = "bfloat16"


class ExportError(Exception):
    pass


@dataclass(frozen=True)
class ExportConfig:
    src: str = option(None, "a training output directory, a checkpoint directory or a draft directory", positional=True)
    out: str | None = option(None, "the directory to write (replaced if it is an earlier export)")
    dtype: str = option(
        DEFAULT_DTYPE,
        "of the floating-point weights (bfloat16, as engines serve drafts; float32 keeps the trained weights exactly)",
        choices=sorted(DTYPES),
    )

    def check(self) -> list[str]:
        return [] if self.out else ["--out DIR is required"]


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


def load_source(draft_dir: Path):
    """(family, draft) of ``draft_dir``, checked for the serving engines (an ExportError names the problem)."""
    try:
        family, draft = drafts.load_draft(draft_dir)
    except (DraftLoadError, OSError) as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # unreadable safetensors
        raise ExportError(f"{draft_dir} is not a readable draft: {exc}") from None
    errors, _ = family.export_problems(draft)
    if errors:
        raise ExportError(f"{draft_dir}: {'; '.join(errors)}")
    return family, draft


def export(src: Path, out: Path, dtype: str = DEFAULT_DTYPE) -> tuple[str, str | None]:
    """Writes the engines' layout of ``src``'s draft to ``out``; returns a one-line summary and a
    warning (or None)."""
    draft_dir = resolve_source(src)
    family, draft = load_source(draft_dir)
    if out.resolve() in (src.resolve(), draft_dir.resolve()):
        raise ExportError(f"--out {out} is the source itself; export to another directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_earlier_export(out))):
        raise ExportError(
            f"--out {out} exists and is not an empty directory or an earlier export; refusing to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged(out) as staging:
        draft.save(staging, DTYPES[dtype], private=False)
        atomic.make_readable(staging)
    c = draft.config
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 2**20
    architecture = json.loads((out / CONFIG_NAME).read_text())["architectures"][0]
    summary = (
        f"exported {draft_dir} -> {out}: {family.title} ({architecture}), hidden {c.hidden_size}, vocab "
        f"{getattr(c, 'draft_vocab_size', c.vocab_size)}/{c.vocab_size}, target layers {list(c.feature_layers)} "
        f"(vLLM's count; SGLang's {[i - 1 for i in c.feature_layers]}), {dtype}, {size_mb:.1f} MiB"
    )
    _, warnings = family.export_problems(draft)
    return summary, "; ".join(f"warning: {w}" for w in warnings) or None


def main(argv=None) -> int:
    args = parse(ExportConfig, argv, "python -m torchspec_ext.export", __doc__.split("\n\n")[0])
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
