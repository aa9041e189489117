"""Options declared once on dataclasses: the parsers of train, eval and export are generated from them."""

from __future__ import annotations

import dataclasses

import pytest

from torchspec_ext import train
from torchspec_ext.options import at_least, option, parse


@dataclasses.dataclass(frozen=True)
class Example:
    name: str = option("x", "a name", choices=("x", "y"))
    count: int = option(3, "how many", check=at_least(1))
    ratio: float | None = option(None, "a fraction")
    flag: bool = option(False, "a switch")
    words: list[str] = option(["a"], "some words")
    hidden: int = option(7, cli=False)

    def check(self) -> list[str]:
        return ["--ratio needs --flag"] if self.ratio is not None and not self.flag else []


def test_a_parser_is_generated_from_the_fields(capsys):
    got = parse(Example, ["--name", "y", "--count", "5", "--ratio", "0.5", "--flag", "--words", "b", "c"])
    assert got == Example("y", 5, 0.5, True, ["b", "c"], 7)
    assert parse(Example, []) == Example()
    with pytest.raises(SystemExit):
        parse(Example, ["--help"])
    text = capsys.readouterr().out
    assert "how many (default: 3)" in text and "--hidden" not in text and "{x,y}" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "0"], "--count must be >= 1"),
        (["--name", "z"], "invalid choice"),
        (["--ratio", "0.5"], "--ratio needs --flag"),
        (["--hidden", "1"], "unrecognized arguments"),
    ],
)
def test_each_check_is_a_usage_error_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(Example, argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_config_file_fills_options_under_the_flags(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('count = 9\nname = "y"\n')
    assert parse(Example, ["--config", str(config), "--count", "4"]) == Example(name="y", count=4)
    (tmp_path / "bad.json").write_text('{"cont": 3}')
    with pytest.raises(SystemExit):
        parse(Example, ["--config", str(tmp_path / "bad.json")])
    assert "unknown option(s) cont" in capsys.readouterr().err


def test_train_config_is_frozen_and_resolved_once():
    config = train.parse_args(["--device", "cpu", "--max-steps", "5"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_steps = 6
    assert config.family_options.ttt_steps == 3 and config.epochs == 3 and config.time_budget is None


def test_an_option_of_another_family_is_refused(capsys, monkeypatch):
    from torchspec_ext import drafts
    from torchspec_ext.training import config as config_module

    @dataclasses.dataclass(frozen=True)
    class OtherOptions:
        other_width: int = option(16, "another family's option")

        def resolved(self, on_gpu):
            return self

    other = type("Other", (drafts.DraftFamily,), {"name": "other", "title": "Other", "Options": OtherOptions})()
    monkeypatch.setitem(drafts.FAMILIES, "other", other)
    monkeypatch.setattr(drafts, "TRAINABLE", [*drafts.TRAINABLE, "other"])
    monkeypatch.setattr(config_module.drafts, "TRAINABLE", drafts.TRAINABLE)
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cpu", "--other-width", "8"])
    assert "--other-width is one of the Other options; this run trains EAGLE-3" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a registered family's option, likewise
        train.parse_args(["--device", "cpu", "--block-size", "8"])
    assert "--block-size is one of the DFlash options; this run trains EAGLE-3" in capsys.readouterr().err
