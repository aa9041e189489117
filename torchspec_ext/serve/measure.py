"""``python -m torchspec_ext.serve.measure --draft DIR``: does a served draft get faster the more it is used?

Builds a stream of distinct prompts unlike the draft's training data (MT-Bench's and HumanEval's
questions, shuffled with a fixed seed; an MT-Bench second turn is asked after the server's own answer
to its first, and comes later in the stream), then, one server at a time, sends the stream through
the HTTP API (the official ``openai`` client, streamed, greedy) to ``python -m torchspec_ext.serve``
with the draft frozen and with ``--learn``. Afterwards the target decodes every prompt plainly
(transformers' ``generate``, same dtype) to check that each greedy answer is identical.

Writes OUT/serve_stream-MODE.json as each server finishes, then OUT/serve_stream.json (every
request), OUT/serve_stream.md (the table) and a PNG of the rolling acceptance length against
requests served (``--plot``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torchspec_ext.options import at_least, option, parse

MODES = ("frozen", "learn")


@dataclass(frozen=True)
class MeasureConfig:
    draft: str = option(None, "the draft directory to serve (the default run's: torchspec_out/draft)")
    target: str | None = option(None, "a Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    requests: int = option(300, "prompts in the stream (each distinct)", check=at_least(2))
    max_tokens: int = option(64, "per answer", check=at_least(1))
    max_prompt_tokens: int = option(1024, "first-turn prompts longer than this are passed over", check=at_least(16))
    window: int = option(100, "requests compared at the start and the end of the stream", check=at_least(1))
    rolling: int = option(25, "requests in the plot's rolling acceptance length", check=at_least(1))
    modes: str = option("frozen,learn", "comma-separated: frozen, learn")
    dtype: str = option(
        "float32", "of the target, in the servers and the plain decoding", choices=("float32", "bfloat16")
    )
    seed: int = option(0, "of the stream's shuffle")
    out: str = option("serve_measure", "folder of the JSON and Markdown results")
    plot: str | None = option("docs/serving_acceptance.png", "the PNG to write ('' for none)")
    server_args: str = option("", "more arguments for every server, e.g. '--no-combine --learn-lr 1e-3'")
    skip_plain: bool = option(False, "do not check the answers against plain decoding")

    def check(self) -> list[str]:
        problems = [] if self.draft else ["--draft DIR is required"]
        unknown = [m for m in self.modes.split(",") if m not in MODES]
        return problems + ([f"--modes: unknown {unknown}; choose from {MODES}"] if unknown else [])


@dataclass(frozen=True)
class Turn:
    key: str  # item id and turn
    item: object  # evalsets.PromptItem
    turn: int


def build_stream(tokenizer, count: int, max_prompt_tokens: int, seed: int) -> list[Turn]:
    """``count`` turns of MT-Bench and HumanEval in a seeded shuffle; an item's second turn after its first."""
    from torchspec_ext.evalsets import load_prompt_sets

    sets = load_prompt_sets(["mt-bench", "humaneval"], tokenizer, max_prompt_tokens=max_prompt_tokens, seed=seed)
    turns = [Turn(f"{s.name}/{item.id}/{t}", item, t) for s in sets for item in s.items for t in range(len(item.turns))]
    seen, distinct = set(), []
    for t in turns:  # no question twice
        text = t.item.turns[t.turn]
        if text not in seen:
            seen.add(text)
            distinct.append(t)
    random.Random(seed).shuffle(distinct)
    slots: dict[str, list[int]] = {}
    for i, t in enumerate(distinct):
        slots.setdefault(t.item.id + "@" + t.key.split("/")[0], []).append(i)
    ordered = list(distinct)
    for positions in slots.values():  # the item's turns take its slots in turn order
        by_turn = sorted((distinct[i] for i in positions), key=lambda t: t.turn)
        for i, t in zip(sorted(positions), by_turn):
            ordered[i] = t
    if len(ordered) < count:
        raise SystemExit(f"serve.measure: only {len(ordered)} distinct prompts fit; ask for --requests {len(ordered)}")
    return ordered[:count]


class ServerProcess:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "torchspec_ext.serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
        deadline = time.monotonic() + 900
        while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise SystemExit(f"serve.measure: the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.url = found.group(1)

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=60) as response:
            text = response.read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^torchspec_(\S+) (\S+)$", text, re.M)}

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(900)


def ask(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    begin = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
    )  # fmt: skip
    text, ids, prompt_ids, info, first_token = "", [], None, {}, None
    for chunk in stream:
        extra = chunk.model_extra or {}
        prompt_ids = extra.get("prompt_token_ids", prompt_ids)
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta.content:
                text += choice.delta.content
                first_token = first_token or time.perf_counter() - begin
            ids += (choice.model_extra or {}).get("token_ids") or []
        info = extra.get("speculative", info)
    return {
        "text": text, "token_ids": ids, "prompt_token_ids": prompt_ids, "seconds": time.perf_counter() - begin,
        "first_token_seconds": first_token, **info,
    }  # fmt: skip


def run_mode(mode: str, config: MeasureConfig, stream: list[Turn], tokenizer, work: Path) -> dict:
    import openai

    from torchspec_ext.evalsets import turn_messages

    args = ["--draft", config.draft, "--dtype", config.dtype, *config.server_args.split()]
    args += ["--target", config.target] if config.target else []
    if mode == "learn":
        args += ["--learn", "--output-dir", str(work / "learned")]
    server = ServerProcess(args, work / f"server-{mode}.log")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=os.environ.get("TORCHSPEC_SERVE_API_KEY", "none"))
    model = client.models.list().data[0].id
    answers: dict[str, str] = {}
    records = []
    for i, turn in enumerate(stream):
        earlier = [answers[f"{turn.key.rsplit('/', 1)[0]}/{t}"] for t in range(turn.turn)]
        messages = turn_messages(tokenizer, turn.item, earlier)
        record = {"index": i, "key": turn.key, **ask(client, model, messages, config.max_tokens)}
        answers[turn.key] = record["text"]
        records.append(record)
        print(
            f"[measure] {mode} {i + 1}/{len(stream)}: {len(record['token_ids'])} tokens, acceptance "
            f"{record.get('acceptance_length', 0):.2f}, {record['seconds']:.1f} s, "
            f"draft v{record.get('draft_version')}",
            file=sys.stderr,
            flush=True,
        )
    final = server.metrics()
    code = server.stop()
    return {"mode": mode, "records": records, "metrics": final, "exit_code": code}


def plain_answers(config: MeasureConfig, prompts: list[list[int]]) -> dict[tuple, list[int]]:
    import torch

    from torchspec_ext.eval import generate_decode
    from torchspec_ext.options import DTYPES
    from torchspec_ext.target import load_target, stop_token_ids

    target, tokenizer = load_target(config.target, DTYPES[config.dtype])
    eos = stop_token_ids(target, tokenizer)
    out = {}
    torch.manual_seed(0)
    for i, ids in enumerate(prompts):
        if tuple(ids) not in out:
            out[tuple(ids)] = generate_decode(target, ids, config.max_tokens, 0.0, eos).tokens
        print(f"[measure] plain decoding {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    return out


def window_figures(records: list[dict]) -> dict:
    tokens = sum(len(r["token_ids"]) for r in records)
    forwards = sum(r.get("target_forwards", 0) for r in records)
    seconds = sum(r["seconds"] for r in records)
    return {"acceptance_length": tokens / max(forwards, 1), "tokens_per_s": tokens / seconds, "tokens": tokens}


def summarize(runs: list[dict], window: int) -> dict:
    rows = []
    for run in runs:
        records = run["records"]
        w = min(window, len(records) // 2)
        first, last = window_figures(records[:w]), window_figures(records[-w:])
        same = [r.get("same_as_plain") for r in records]
        rows.append(
            {
                "mode": run["mode"],
                "window": w,
                "first": first,
                "last": last,
                "acceptance_gain": last["acceptance_length"] - first["acceptance_length"],
                "speed_ratio": last["tokens_per_s"] / first["tokens_per_s"],
                "same_as_plain": sum(bool(s) for s in same),
                "checked": sum(s is not None for s in same),
                "requests": len(records),
                "draft_updates": run["metrics"].get("draft_updates_total", 0),
                "learner_steps": run["metrics"].get("learner_steps_total"),
                "exit_code": run["exit_code"],
            }
        )
    return {"rows": rows}


def markdown(summary: dict, config: MeasureConfig) -> str:
    lines = [
        f"{config.requests} requests (MT-Bench + HumanEval, seed {config.seed}), up to {config.max_tokens} tokens, "
        f"greedy, streamed through the HTTP API; draft {config.draft}; {config.dtype}; server args "
        f"'{config.server_args}'",
        "",
        "| mode | first N | acceptance, first N | acceptance, last N | gain | tokens/s, first N | tokens/s, last N "
        "| last / first | greedy = plain | draft updates | learner steps | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['mode']} | {r['window']} | {r['first']['acceptance_length']:.3f} "
            f"| {r['last']['acceptance_length']:.3f} "
            f"| {r['acceptance_gain']:+.3f} | {r['first']['tokens_per_s']:.2f} | {r['last']['tokens_per_s']:.2f} "
            f"| {r['speed_ratio']:.2f}x | {r['same_as_plain']}/{r['checked']} | {int(r['draft_updates'])} "
            f"| {r['learner_steps'] if r['learner_steps'] is not None else '-'} | {r['exit_code']} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], rolling: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        records = run["records"]
        xs, ys = [], []
        for end in range(1, len(records) + 1):
            chunk = records[max(0, end - rolling) : end]
            xs.append(end)
            ys.append(window_figures(chunk)["acceptance_length"])
        ax.plot(xs, ys, label="--learn" if run["mode"] == "learn" else "frozen draft")
    ax.set_xlabel("requests served")
    ax.set_ylabel(f"acceptance length (last {rolling} requests)")
    ax.set_title("Served draft: acceptance length over the stream")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    config = parse(MeasureConfig, argv, "python -m torchspec_ext.serve.measure", __doc__.split("\n\n")[0])
    from transformers import AutoTokenizer

    from torchspec_ext.target import default_target_dir

    tokenizer = AutoTokenizer.from_pretrained(config.target or default_target_dir())
    stream = build_stream(tokenizer, config.requests, config.max_prompt_tokens, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="serve-measure-") as work:
        for mode in config.modes.split(","):
            runs.append(run_mode(mode, config, stream, tokenizer, Path(work)))
            (out / f"server-{mode}.log").write_text((Path(work) / f"server-{mode}.log").read_text())
            # kept as soon as the server is done: a failure later does not lose this mode's requests
            (out / f"serve_stream-{mode}.json").write_text(json.dumps(runs[-1], indent=1))
    if not config.skip_plain:
        prompts = [r["prompt_token_ids"] for run in runs for r in run["records"]]
        plain = plain_answers(config, prompts)
        for run in runs:
            for r in run["records"]:
                r["same_as_plain"] = r["token_ids"] == plain[tuple(r["prompt_token_ids"])]
    summary = summarize(runs, config.window)
    table = markdown(summary, config)
    (out / "serve_stream.json").write_text(json.dumps({"config": config.__dict__, "runs": runs, **summary}, indent=1))
    (out / "serve_stream.md").write_text(table)
    if config.plot:
        plot(runs, config.rolling, Path(config.plot))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
