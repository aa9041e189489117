"""Draft families behind one interface (:class:`DraftFamily`, in ``base``), and their registry.

``train``, ``eval``, ``export`` and ``speculate`` reach a family only through this registry: adding
a family is one module beside this one and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchspec_ext.drafts.base import DraftFamily, DraftLoadError, read_config
from torchspec_ext.drafts.dflash import DFlashFamily, DSparkFamily
from torchspec_ext.drafts.eagle3 import Eagle3Family
from torchspec_ext.drafts.itself import TargetItselfFamily
from torchspec_ext.drafts.lookup import PromptLookupFamily
from torchspec_ext.drafts.suffix import SuffixFamily
from torchspec_ext.small_rows import enable_small_rows

FAMILIES: dict[str, DraftFamily] = {
    family.name: family
    for family in (
        Eagle3Family(),
        DFlashFamily(),
        DSparkFamily(),
        PromptLookupFamily(),
        SuffixFamily(),
        TargetItselfFamily(),
    )
}
TRAINABLE = [name for name, family in FAMILIES.items() if family.trainable]


def family(name: str) -> DraftFamily:
    if name not in FAMILIES:
        raise KeyError(f"no draft family {name!r}; the families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: dict, directory: Path) -> DraftFamily:
    """The family whose drafts have ``config``'s architecture."""
    architectures = config.get("architectures") or []
    for candidate in FAMILIES.values():
        if any(a in candidate.architectures for a in architectures):
            return candidate
    known = ", ".join(f"{f.title} ({', '.join(f.architectures)})" for f in FAMILIES.values() if f.architectures)
    raise DraftLoadError(f"{directory}: architectures {architectures} is not a draft of any family here: {known}")


def check_family(config: dict, expected: type[DraftFamily], directory: Path) -> None:
    """A DraftLoadError naming both families when ``config`` is a draft of another family than ``expected``."""
    found = family_of_config(config, directory)
    if not isinstance(found, expected):
        raise DraftLoadError(
            f"{directory} holds a {found.title} draft, not an {expected.title} one: load it as {found.title} "
            f"(its config.json's architectures: {config.get('architectures')})"
        )


def read_family_config(directory: Path, family: type[DraftFamily], parse: Callable[[dict], Any]) -> tuple[dict, Any]:
    """(config.json, ``parse`` of it) of a folder that must hold a draft of ``family``; a DraftLoadError
    names what is wrong (no draft, another family's, an unreadable config)."""
    raw = read_config(directory)
    check_family(raw, family, directory)
    try:
        return raw, parse(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise DraftLoadError(f"{directory}: unreadable {family.title} config ({type(exc).__name__}: {exc})") from None


def load_draft(directory: Path, target=None):
    """(family, draft) of a folder written by ``train`` or ``export``, whatever its family; with a
    ``target``, a DraftLoadError before any weight is read when the draft was made for another one.
    The draft's few-row products take the fastest measured way (``small_rows``), as the target's do,
    bfloat16 copies of its weights among them (its proposals are checked by the target)."""
    directory = Path(directory)
    raw = read_config(directory)
    found = family_of_config(raw, directory)
    if target is not None:
        check_target(found, raw, target, directory)
    draft = found.load(directory, target)
    enable_small_rows(draft, bfloat16_copy=True)
    return found, draft


def check_target(found: DraftFamily, raw: dict, target, directory: Path) -> None:
    try:
        c = found.config_from(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise DraftLoadError(
            f"{directory} is not a readable {found.title} draft: {type(exc).__name__}: {exc}"
        ) from None
    t = target.config
    if (
        c.vocab_size != t.vocab_size
        or c.hidden_size != t.hidden_size
        or any(not 0 <= i <= t.num_hidden_layers for i in c.feature_layers)
    ):
        raise DraftLoadError(
            f"{directory}: it was made for another target (vocab {c.vocab_size}, hidden {c.hidden_size}, "
            f"feature layers {c.feature_layers}; the target has vocab {t.vocab_size}, hidden "
            f"{t.hidden_size}, {t.num_hidden_layers} layers)"
        )


__all__ = ["FAMILIES", "TRAINABLE", "DraftFamily", "DraftLoadError", "check_family", "family", "load_draft"]
