"""Command line: ``python -m torchspec_ext.bench NAME [--device cpu|cuda|auto] [--repeat N] [--quick] [--json PATH]``.

Prints a Markdown report to stdout (progress to stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Sequence

# name -> (module with run(args) -> Report and optionally add_arguments(parser), one-line help).
BENCHMARKS = {
    "topk": ("torchspec_ext.bench.topk", "fused top-k log-probs vs torch.topk + logsumexp (and vs the GEMM)"),
    "draft_loss": ("torchspec_ext.bench.draft_loss", "fused LM head + top-k teacher loss, forward + backward, vs eager"),
    "tree": ("torchspec_ext.bench.tree", "tree attention vs SDPA with a dense mask, and tree verification"),
    "pipeline": ("torchspec_ext.bench.pipeline", "tensor pipeline vs raw torch.distributed send/recv, and overlap"),
    "train": ("torchspec_ext.bench.train", "training-loop tokens/s with the custom ops vs --reference-ops"),
}


def main(argv: Sequence[str] | None = None) -> int:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    shared.add_argument("--repeat", type=int, help="timed calls per measurement (default: 3 to 5 on CPU, 20 on CUDA)")
    shared.add_argument("--quick", action="store_true", help="small sizes for smoke tests; targets are not checked")
    shared.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser = argparse.ArgumentParser(prog="python -m torchspec_ext.bench", description="torchspec_ext benchmarks")
    sub = parser.add_subparsers(dest="name", required=True, metavar="BENCHMARK")
    subparsers = {name: sub.add_parser(name, parents=[shared], help=text) for name, (_, text) in BENCHMARKS.items()}

    # Import only the chosen benchmark, then let it add its own flags before the full parse.
    name = parser.parse_known_args(argv)[0].name
    module = importlib.import_module(BENCHMARKS[name][0])
    if hasattr(module, "add_arguments"):
        module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")

    report = module.run(args)
    print(report.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
