"""Command line: ``python -m torchspec_ext.bench NAME [--device cpu|cuda|auto] [--repeat N] [--quick] [--json PATH]``,
or ``python -m torchspec_ext.bench all [--device ...] [--quick] [--out DIR] [--parts a,b] [--draft DIR]``.

NAME prints a Markdown report to stdout (progress to stderr); ``all`` runs the parts in turn and
also writes report.md, report.json and plots into --out, docs/bench by default (see :mod:`torchspec_ext.bench.report`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# name -> (module with run(args) -> Report and optionally add_arguments(parser), one-line help);
# `all` runs them in this order.
BENCHMARKS = {
    "topk": ("torchspec_ext.bench.topk", "fused top-k log-probs vs torch.topk + logsumexp (and vs the GEMM)"),
    "draft_loss": (
        "torchspec_ext.bench.draft_loss",
        "fused LM head + top-k teacher loss, forward + backward, vs eager",
    ),
    "tree": ("torchspec_ext.bench.tree", "tree attention vs SDPA with a dense mask, and tree verification"),
    "small_rows": (
        "torchspec_ext.bench.small_rows",
        "decoding's few-row products: the small_rows_linear kernel vs x @ W.T and (W @ x.T).T, against the read floor",
    ),
    "pipeline": ("torchspec_ext.bench.pipeline", "tensor pipeline vs raw torch.distributed send/recv, and overlap"),
    "train": ("torchspec_ext.bench.train", "training-loop tokens/s with the custom ops vs --reference-ops"),
    "acceptance": (
        "torchspec_ext.bench.acceptance",
        "a trained draft's acceptance length, chain and trees of several sizes",
    ),
    "lossless": (
        "torchspec_ext.bench.lossless",
        "where verification's logits part from plain decoding's, per dtype (model attention vs tree_attention)",
    ),
    "peers-train": (
        "torchspec_ext.bench.peers_train",
        "SpecForge's EAGLE-3 training recipe vs ours at equal CPU minutes, then eval (needs SpecForge: else skipped)",
    ),
}
# `all`'s report goes beside the plots that the README shows, so that a run brings them up to date.
DEFAULT_OUT = Path("docs") / "bench"


def shared_arguments() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    shared.add_argument("--repeat", type=int, help="timed calls per measurement (default: 3 to 5 on CPU, 20 on CUDA)")
    shared.add_argument("--quick", action="store_true", help="small sizes for smoke tests; targets are not checked")
    return shared


def add_benchmark_arguments(parser: argparse.ArgumentParser, name: str) -> ModuleType:
    """Imports benchmark ``name`` and lets it add its own flags to ``parser``; the module."""
    module = importlib.import_module(BENCHMARKS[name][0])
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return module


def part_runner(name: str, args: argparse.Namespace):
    """For ``all``: a call that runs benchmark ``name`` with its own defaults and ``all``'s shared flags."""

    def run():
        parser = argparse.ArgumentParser(prog=f"bench {name}", parents=[shared_arguments()])
        module = add_benchmark_arguments(parser, name)
        argv = (
            ["--device", args.device]
            + ["--quick"] * args.quick
            + (["--repeat", str(args.repeat)] if args.repeat else [])
        )
        if name == "acceptance" and args.draft:
            argv += ["--draft", args.draft]
        return module.run(parser.parse_args(argv))

    return run


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in BENCHMARKS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BENCHMARKS)}"
        )
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = shared_arguments()
    shared.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser = argparse.ArgumentParser(prog="python -m torchspec_ext.bench", description="torchspec_ext benchmarks")
    sub = parser.add_subparsers(dest="name", required=True, metavar="BENCHMARK")
    subparsers = {name: sub.add_parser(name, parents=[shared], help=text) for name, (_, text) in BENCHMARKS.items()}
    every = sub.add_parser("all", parents=[shared_arguments()], help="every part in turn, into one report with plots")
    every.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for report.md, report.json, PNGs (default: {DEFAULT_OUT})",
    )
    every.add_argument("--parts", type=parse_parts, default=None, help="comma-separated subset (default: all parts)")
    every.add_argument(
        "--draft", default=None, metavar="DIR", help="the acceptance part's draft (default: torchspec_out/draft)"
    )

    # Import only the chosen benchmark, then let it add its own flags before the full parse.
    name = parser.parse_known_args(argv)[0].name
    module = add_benchmark_arguments(subparsers[name], name) if name != "all" else None
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")

    if module is None:
        from torchspec_ext.bench.report import command_line, run_all

        parts = args.parts or list(BENCHMARKS)
        text, _ = run_all(parts, args.device, args.out, lambda part: part_runner(part, args), command_line(argv))
        print(text)
        return 0
    from torchspec_ext.bench.common import Skipped

    try:
        report = module.run(args)
    except Skipped as exc:
        raise SystemExit(f"bench {name}: skipped: {exc}") from None
    print(report.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
