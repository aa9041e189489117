#!/usr/bin/env python3
"""Host memory and reads of a sharded teacher's start, measured on a CPU gloo job.

Launches ``python -m torchspec_ext.train`` as torchrun would (one process per rank on 127.0.0.1),
``--teacher-ranks T --teacher-shards S`` plus one trainer, for a few steps, and samples every rank's
/proc/PID/status 20 times a second: the peak resident set (VmHWM), the peaks of its anonymous and
file-backed parts (file-backed: the shared libraries, and pages of memory-mapped safetensors
files), the resident set when the rank has joined the job and not yet read the target, and the
peak until a teacher's shard is ready (its "holds" line; a trainer: its first step). Times from
the launch: a teacher's shard ready, and the lead trainer's first step (it has received the first
teacher batch). Bytes read: what a teacher's summary says its reader read (``read_mib``); a rank
that loads the target whole with ``from_pretrained`` reads every tensor of the checkpoint.

The target: ``--target DIR``, the default target (no flag), or ``--synthetic GB``: a random Llama
of about that many GB of float32 weights (hidden 2048, vocab 49152, untied, as many layers as the
size takes) with the default target's tokenizer, written once by save_pretrained in 512 MB files.
``--code DIR`` runs another checkout's torchspec_ext (the code before sharded loading, to compare).

Usage: python scripts/measure_sharded_loading.py [--synthetic 2.5] [--teachers 3 --shards 3] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a red kite", "bread", "trains", "the moon", "a garden", "chess", "rain", "tea", "owls"]
SMALL = (
    "--batch-size 2 --max-length 64 --ttt-steps 2 --topk 8 --draft-vocab 256 --vocab-sample 50 --held-out 0.2 "
    "--eval-interval 0 --eval-prompts 1 --eval-new-tokens 4 --eval-depth 2 --eval-tree-topk 1 --log-interval 1 "
    "--warmup-steps 1 --device cpu --target-dtype float32"
).split()


def write_synthetic(directory: Path, gb: float) -> Path:
    """A random untied Llama of about ``gb`` GB in float32, in 512 MB safetensors files."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from torchspec_ext.target import default_target_dir

    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    hidden, inter, vocab = 2048, 5632, len(tokenizer)
    per_layer = 2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * inter
    layers = max(1, round((gb * 1e9 / 4 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=directory.parent))
    LlamaForCausalLM(config).save_pretrained(staging, max_shard_size="512MB")
    tokenizer.save_pretrained(staging)
    os.replace(staging, directory)
    return directory


def write_chats(path: Path) -> Path:
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about {t}."},
                {"role": "assistant", "content": f"Here is a short note about {t}: it is {t}, as ever."},
            ]
        }
        for t in TOPICS
    ]
    path.write_text(json.dumps(chats))
    return path


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of ``pid`` in bytes; {} once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def run_job(code: Path, target: Path | None, teachers: int, shards: int, trainers: int, steps: int, work: Path):
    world = teachers + trainers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--data", str(write_chats(work / "chats.json")), "--output-dir", str(work / "out")]
    args += ["--max-steps", str(steps), *SMALL, "--teacher-ranks", str(teachers), "--dist-timeout", "600"]
    args += ["--teacher-shards", str(shards)] + (["--target", str(target)] if target else [])
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs, begin = [], time.monotonic()
    for rank in range(world):
        env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
            PYTHONPATH=str(code),
        )  # fmt: skip
        with open(logs / f"{rank}.out", "w") as out, open(logs / f"{rank}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torchspec_ext.train", *args], env=env, cwd=code, stdout=out, stderr=err
                )
            )
    peaks = [dict.fromkeys(("VmHWM", "RssAnon", "RssFile"), 0) for _ in range(world)]
    joined_rss, ready_peak, events = [None] * world, [None] * world, [{} for _ in range(world)]
    while any(p.poll() is None for p in procs):
        now = time.monotonic() - begin
        for rank, p in enumerate(procs):
            status = proc_status(p.pid)
            for key in peaks[rank]:
                peaks[rank][key] = max(peaks[rank][key], status.get(key, 0))
            err = (logs / f"{rank}.err").read_text()
            for name, mark in (
                ("joined", f"[train] rank {rank} of"),
                ("shard_ready", "holds"),
                ("first_step", "step 1/"),
            ):
                if name not in events[rank] and mark in err:
                    events[rank][name] = now
                    if name == "joined":
                        joined_rss[rank] = status.get("VmRSS")
                    if name in ("shard_ready", "first_step"):  # VmHWM only grows: the peak until then
                        ready_peak[rank] = status.get("VmHWM")
        time.sleep(0.05)
    codes = [p.returncode for p in procs]
    if any(codes):
        tail = "\n".join(f"--- rank {r} ---\n" + (logs / f"{r}.err").read_text()[-3000:] for r in range(world))
        raise SystemExit(f"the job failed ({codes}):\n{tail}")
    rows = []
    for rank in range(world):
        summary = json.loads((logs / f"{rank}.out").read_text().strip().splitlines()[-1])
        rows.append(
            {
                "rank": rank,
                "role": summary.get("role"),
                "peak_rss_mib": peaks[rank]["VmHWM"] / 2**20,
                "peak_anon_mib": peaks[rank]["RssAnon"] / 2**20,
                "peak_file_mib": peaks[rank]["RssFile"] / 2**20,
                "rss_at_join_mib": (joined_rss[rank] or 0) / 2**20,
                "peak_at_ready_mib": (ready_peak[rank] or 0) / 2**20,
                "rss_before_load_mib": summary.get("rss_before_load_mib"),
                "load_peak_mib": summary.get("load_peak_rss_mib"),
                "read_mib": summary.get("read_mib"),
                "load_s": summary.get("load_s"),
                "weights_held_mib": summary.get("weights_held_mib"),
                "weights_mib": summary.get("weights_mib"),
                **{f"{k}_s": v for k, v in events[rank].items()},
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, help="a model directory (default: the default target)")
    p.add_argument("--synthetic", type=float, metavar="GB", help="a random Llama of about GB gigabytes instead")
    p.add_argument("--synthetic-dir", type=Path, default=Path(tempfile.gettempdir()) / "torchspec_synthetic_target")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--trainers", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose torchspec_ext runs")
    p.add_argument("--logs", type=Path, help="keep the ranks' logs and the run's output in this (new) folder")
    p.add_argument("--json", type=Path, help="append the rows, with the run's settings, to this JSON-lines file")
    a = p.parse_args()
    target = a.target
    if a.synthetic:
        target = write_synthetic(a.synthetic_dir / f"{a.synthetic:g}GB", a.synthetic)
    files = sorted((target or Path.home() / ".cache/torchspec_ext/SmolLM2-135M-Instruct").glob("*.safetensors"))
    checkpoint_mib = sum(f.stat().st_size for f in files) / 2**20
    if a.logs:
        a.logs.mkdir(parents=True)
        rows = run_job(a.code, target, a.teachers, a.shards, a.trainers, a.steps, a.logs)
    else:
        with tempfile.TemporaryDirectory() as work:
            rows = run_job(a.code, target, a.teachers, a.shards, a.trainers, a.steps, Path(work))
    setting = {"code": str(a.code), "target": str(target or "default"), "teachers": a.teachers, "shards": a.shards}
    setting |= {"trainers": a.trainers, "checkpoint_mib": checkpoint_mib, "files": len(files)}
    print(json.dumps(setting))
    keys = ["rank", "role", "rss_at_join_mib", "rss_before_load_mib", "load_peak_mib", "peak_at_ready_mib"]
    keys += ["peak_rss_mib", "peak_anon_mib", "peak_file_mib", "read_mib", "load_s"]
    keys += ["joined_s", "shard_ready_s", "first_step_s"]
    print("| " + " | ".join(keys) + " |")
    for row in rows:
        cells = [f"{row.get(k):.1f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({**setting, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
