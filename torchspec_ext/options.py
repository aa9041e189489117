"""Command-line options declared once, on a dataclass: each field's default, help, choices and check
live on the field (:func:`option`), and :func:`parse` builds the argparse parser from the fields,
reads an optional JSON or TOML ``--config`` file under the flags, runs the checks, and returns the
dataclass. ``train``, ``eval`` and ``export`` each have one such dataclass.

Also the one map of dtype names this package accepts (:data:`DTYPES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None


def option(
    default: Any = None,
    help: str = "",
    *,
    choices: Sequence | None = None,
    check: Check | None = None,
    metavar: str | None = None,
    positional: bool = False,
    const: Any = None,
    nargs: str | None = None,
    short: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a command-line option (``--field-name``); ``cli=False`` keeps it
    out of the command line (set by the program, or only from a config file)."""
    meta = {
        "help": help,
        "choices": choices,
        "check": check,
        "metavar": metavar,
        "positional": positional,
        "const": const,
        "nargs": nargs,
        "short": short,
        "cli": cli,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}"


def fraction(v) -> str | None:
    return None if 0 < v < 1 else "must be a fraction in (0, 1)"


def positive(v) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, Sequence):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    return annotation, False


def _fields(cls) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, added: set | None = None) -> None:
    """One argument per option field of the dataclass ``cls``; ``added``: the fields already given an
    argument (by a class ``cls`` derives from), which it skips, and to which it adds its own."""
    added = set() if added is None else added
    for f, kind, is_list in _fields(cls):
        if f.name in added:
            continue
        added.add(f.name)
        meta = f.metadata
        names = [f.name] if meta.get("positional") else [flag(f.name)] + ([meta["short"]] if meta.get("short") else [])
        kwargs: dict[str, Any] = {"help": meta.get("help") or None}
        if not meta.get("positional"):
            kwargs["dest"] = f.name
        if kind is bool:  # a flag that is on by default also gets its --no- form
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        else:
            kwargs["type"] = kind
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if is_list:
                kwargs["nargs"] = meta.get("nargs") or "+"
            elif meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
                kwargs["const"] = meta.get("const")
        parser.add_argument(*names, **kwargs)


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def build_parser(classes: Sequence[tuple[str | None, type]], prog: str, description: str) -> argparse.ArgumentParser:
    """A parser of every option of ``classes`` (``(group title or None, dataclass)`` pairs), each
    group's options under its title, with ``--config FILE``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="--config FILE.json|FILE.toml holds any of these options by name, with underscores "
        '(e.g. {"max_steps": 100, "lr": 1e-3}); flags on the command line override it.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="JSON or TOML file of options")
    added = set()
    for title, cls in classes:
        add_options(parser if title is None else parser.add_argument_group(title), cls, added)
        parser.set_defaults(**defaults(cls))
    return parser


def _read_config_file(parser: argparse.ArgumentParser, path: Path) -> dict:
    import tomllib

    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: cannot parse it ({exc})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a table of options, got {type(values).__name__}")
    unknown = sorted(set(values) - {a.dest for a in parser._actions})
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return values


def parse_namespace(parser: argparse.ArgumentParser, argv, classes: Sequence[type]) -> argparse.Namespace:
    """Parses ``argv`` over the ``--config`` file's values, then runs every field's check."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        parser.set_defaults(**_read_config_file(parser, Path(args.config)))
        args = parser.parse_args(argv)  # command-line flags override the file
    for cls in classes:
        for f, _, _ in _fields(cls):
            check = f.metadata.get("check")
            problem = check(getattr(args, f.name)) if check else None
            if problem:
                parser.error(f"{flag(f.name)} {problem}")
    return args


def fill(cls, args: argparse.Namespace | dict):
    """An instance of ``cls`` from the namespace's values of its fields."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def parse(cls, argv=None, prog: str = "", description: str = ""):
    """``cls`` from the command line (and ``--config``): every field's check, then ``cls``'s own
    ``check()`` (problems between options: a list of messages), each failure a usage error."""
    parser = build_parser([(None, cls)], prog, description)
    args = parse_namespace(parser, argv, [cls])
    config = fill(cls, args)
    for problem in config.check() if hasattr(config, "check") else []:
        parser.error(problem)
    return config
