#!/usr/bin/env python3
"""Does ``serve --max-batch`` pay? Concurrent clients through the HTTP API, batched and one at a time.

Starts ``python -m torchspec_ext.serve`` once per ``--max-batch`` value (one server at a time) and sends
the same ``--requests`` distinct prompts (first turns of MT-Bench and HumanEval, shuffled with seed 0)
from ``--clients`` concurrent clients (the official ``openai`` client, streamed, greedy), each client
taking the next prompt when its answer is done. Reports, per server: the wall time of the whole lot,
the tokens/s over it (what the machine delivers), each request's mean latency and time to first token,
and how many answers equal plain decoding's (transformers' ``generate`` of each prompt, same dtype,
timed one at a time: the baseline a user has without us).

Usage: python scripts/measure_serve_batching.py --draft torchspec_out/draft [--requests 16]
       [--clients 4] [--batches 1,4] [--max-tokens 64] [--dtype float32] [--server-args='--no-combine']
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def first_turns(tokenizer, count: int):
    from torchspec_ext.serve.measure import build_stream

    turns = [t for t in build_stream(tokenizer, 2 * count, 1024, seed=0) if t.turn == 0]
    return turns[:count]


def run_server(batch: int, args, turns, tokenizer, work: Path) -> dict:
    import openai

    from torchspec_ext.evalsets import turn_messages
    from torchspec_ext.serve.measure import ServerProcess, ask

    server_args = ["--draft", args.draft, "--dtype", args.dtype, "--max-batch", str(batch), *args.server_args.split()]
    server = ServerProcess(server_args, work / f"server-batch{batch}.log")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=os.environ.get("TORCHSPEC_SERVE_API_KEY", "none"))
    model = client.models.list().data[0].id
    ask(client, model, [{"role": "user", "content": "Hello."}], 8)  # warm-up: first-use measurements
    todo: queue.Queue = queue.Queue()
    for i, turn in enumerate(turns):
        todo.put((i, turn_messages(tokenizer, turn.item, [])))
    records: dict[int, dict] = {}

    def client_loop():
        while True:
            try:
                i, messages = todo.get_nowait()
            except queue.Empty:
                return
            records[i] = ask(client, model, messages, args.max_tokens)

    begin = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    code = server.stop()
    tokens = sum(len(r["token_ids"]) for r in records.values())
    return {
        "max_batch": batch, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_s": statistics.mean(r["seconds"] for r in records.values()),
        "first_token_s": statistics.mean(r["first_token_seconds"] or 0.0 for r in records.values()),
        "records": records, "exit_code": code,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--server-args", default="")
    args = parser.parse_args()

    from torchspec_ext.eval import generate_decode
    from torchspec_ext.options import DTYPES
    from torchspec_ext.target import load_target, stop_token_ids

    target, tokenizer = load_target(None, DTYPES[args.dtype])
    turns = first_turns(tokenizer, args.requests)
    work = Path(tempfile.mkdtemp(prefix="serve_batching_"))
    runs = [run_server(int(b), args, turns, tokenizer, work) for b in args.batches.split(",")]

    from torchspec_ext.evalsets import turn_prompt

    eos = stop_token_ids(target, tokenizer)
    plain, plain_tokens, plain_seconds = {}, 0, 0.0
    generate_decode(target, turn_prompt(tokenizer, turns[0].item), 4, 0.0, eos)  # warm-up
    for i, turn in enumerate(turns):
        out = generate_decode(target, turn_prompt(tokenizer, turn.item), args.max_tokens, 0.0, eos)
        plain[i], plain_tokens, plain_seconds = out.tokens, plain_tokens + len(out.tokens), plain_seconds + out.seconds
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.dtype}, "
          f"{args.requests} requests from {args.clients} clients, {args.max_tokens} tokens each, "
          f"server args {args.server_args!r}")  # fmt: skip
    print("| server | wall s | tokens/s | vs plain | mean latency s | first token s | answers = plain |")
    print("|---|---|---|---|---|---|---|")
    base = plain_tokens / plain_seconds
    print(f"| plain decoding, one at a time | {plain_seconds:.1f} | {base:.1f} | 1.00x | - | - | - |")
    for run in runs:
        same = sum(run["records"][i]["token_ids"] == plain[i] for i in plain)
        print(
            f"| --max-batch {run['max_batch']} | {run['wall_s']:.1f} | {run['tokens_per_s']:.1f} | "
            f"{run['tokens_per_s'] / base:.2f}x | {run['latency_s']:.2f} | {run['first_token_s']:.2f} | "
            f"{same}/{len(plain)} |"
        )
        if run["exit_code"] != 0:
            print(f"server --max-batch {run['max_batch']} exited {run['exit_code']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
