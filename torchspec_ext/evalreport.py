"""``eval``'s report: the decodes of a run summed per set, per category and per mode
(:mod:`torchspec_ext.evalstats`), as one JSON-ready dict, as Markdown tables, and the plot of the
acceptance rate at each draft position."""

from __future__ import annotations

from pathlib import Path

from torchspec_ext.evalstats import Decode, aggregate


def build_report(header: dict, records: list[Decode], depth: int | dict[str, int]) -> dict:
    """``depth``: how many draft positions the acceptance rates cover, for every mode or per mode (a
    mode's own depth: its rates stop there). ``rows``: per mode over every set; ``sets``: per set and
    mode; ``categories``: per set, category and mode where a set has several; ``turns``: per set, turn
    and mode where items have several."""
    modes = header.get("modes", {})
    rows = aggregate(records, by=("mode",), positions=depth)
    for row in rows:
        row["max_nodes"] = modes.get(row["mode"], {}).get("max_nodes")
    varies = lambda field: {
        name for name in {d.set for d in records} if len({getattr(d, field) for d in records if d.set == name}) > 1
    }
    categories, turns = varies("category"), varies("turn")
    return {
        "header": header,
        "rows": rows,
        "sets": aggregate(records, by=("set", "mode"), positions=depth),
        "categories": [
            r for r in aggregate(records, by=("set", "category", "mode"), positions=depth) if r["set"] in categories
        ],
        "turns": [r for r in aggregate(records, by=("set", "turn", "mode"), positions=depth) if r["set"] in turns],
    }


def _num(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _mode_table(rows: list[dict], greedy: bool) -> list[str]:
    same = "outputs equal to plain" if greedy else "outputs equal to plain (sampling)"
    lines = [
        f"| mode | acceptance length | vLLM's count | tokens/s | speed-up | {same} | tokens before the first split |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.get("agreeing_fraction")
        agree = f"{r['agreeing_tokens']}" + (f" ({100 * share:.0f}%)" if share is not None else "")
        lines.append(
            f"| {r['mode']} | {_num(r['acceptance_length'])} | {_num(r.get('acceptance_length_vllm'))} | "
            f"{_num(r['tokens_per_s'], 1)} | {_num(r['speedup'], 2, 'x')} | "
            f"{r['same_as_plain']}/{r['compared_with_plain']} | {agree} |"
        )
    return lines


def _pivot(rows: list[dict], key: str) -> list[str]:
    """Acceptance length with ``key`` (category, turn) down and modes across."""
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["mode"] != "plain"))
    lines = [f"| {key} | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for value in dict.fromkeys(r[key] for r in rows):
        cells = {r["mode"]: r for r in rows if r[key] == value}
        lines.append(f"| {value} | " + " | ".join(_num(cells[m]["acceptance_length"]) for m in modes) + " |")
    return lines


def _combination_lines(mode: str, c: dict) -> list[str]:
    """What a combination's step cost beside the target's forward, and how well each member's calibrated
    confidence predicted what the target followed (``drafts.combined.CombinedStats.report``)."""
    building = c["merge_ms_per_step"] + sum(m["propose_ms_per_step"] for m in c["members"].values())
    lines = [
        f"{mode}: building the tree {building:.2f} ms a step (merging {c['merge_ms_per_step']:.2f}), the target's "
        f"forward {_num(c.get('forward_ms_per_step'))} ms; {c['verified_nodes_per_step']:.1f} nodes verified a step, "
        f"calibration error of the verified nodes {_num(c['verified_calibration_error'], 3)}",
        "",
        "| member | proposing, ms a step | nodes proposed | verified | accepted | calibration error (raw score's) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in c["members"].items():
        lines.append(
            f"| {name} | {m['propose_ms_per_step']:.2f} | {m['proposed_per_step']:.1f} | {m['verified_per_step']:.1f} "
            f"| {m['accepted_per_step']:.2f} | {_num(m['calibration_error'], 3)} ({_num(m['raw_score_error'], 3)}) |"
        )
    return lines


def markdown(report: dict) -> str:
    h = report["header"]
    sets = ", ".join(f"{n} {s['items']} of {s['of']} ({s['too_long']} too long)" for n, s in h["sets"].items())
    lines = [
        f"draft: {h['draft']} ({h['family']}); target: {h['target']} in {h['dtype']}, {h['threads']} threads; "
        f"prompts: {sets}; up to {h['max_new_tokens']} new tokens a turn, temperature {h['temperature']}; "
        f"prompt lookup {h['lookup_tokens']} tokens",
    ]
    if h.get("template_warning"):
        lines += ["", f"warning: {h['template_warning']}"]
    greedy = h["temperature"] == 0
    lines += ["", "all sets:", "", *_mode_table(report["rows"], greedy)]
    for name in h["sets"]:
        lines += ["", f"{name}:", "", *_mode_table([r for r in report["sets"] if r["set"] == name], greedy)]
        by_category = [r for r in report["categories"] if r["set"] == name]
        if by_category:
            lines += ["", f"{name}, acceptance length per category:", "", *_pivot(by_category, "category")]
        by_turn = [r for r in report["turns"] if r["set"] == name]
        if by_turn:
            lines += ["", f"{name}, acceptance length per turn:", "", *_pivot(by_turn, "turn")]
    for mode, c in (h.get("combination") or {}).items():
        lines += ["", *_combination_lines(mode, c)]
    positioned = [r for r in report["rows"] if r.get("per_position_acceptance")]
    if positioned:
        depth = max(len(r["per_position_acceptance"]) for r in positioned)
        lines += [
            "",
            "acceptance rate at each draft position (the fraction of drafting steps that accepted at least that "
            "many draft tokens):",
            "",
            "| mode | " + " | ".join(str(i + 1) for i in range(depth)) + " |",
            "|---|" + "---|" * depth,
        ]
        for r in positioned:
            rates = [_num(v) for v in r["per_position_acceptance"]]
            lines.append(f"| {r['mode']} | " + " | ".join(rates + [""] * (depth - len(rates))) + " |")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """The acceptance rate at each draft position, one line per speculative mode, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["rows"]:
        rates = row.get("per_position_acceptance") or []
        if rates:
            ax.plot(range(1, len(rates) + 1), rates, "o-", label=f"{row['mode']} ({row['acceptance_length']:.2f})")
    h = report["header"]
    ax.set(
        xlabel="draft position",
        ylabel="fraction of steps accepting it",
        ylim=(0, 1),
        title=f"{h['family']} on {', '.join(h['sets'])} ({h['dtype']})",
    )
    ax.legend(fontsize=7, title="mode (acceptance length)", title_fontsize=7)
    ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
