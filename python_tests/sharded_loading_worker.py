"""A rank of test_sharded_loading.py's job: reads its shard of a target (RANK, WORLD_SIZE and MASTER_*
from the environment, gloo), runs it on fixed ids, and writes what it read and held to OUT/RANK.json
(rank 0 also the hidden states and logits to OUT/outputs.pt)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from torchspec_ext import sharding
from torchspec_ext.target import empty_target, weight_files


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(directory: str, out: str, chunk_bytes: str) -> None:
    sharding.READ_CHUNK_BYTES = int(chunk_bytes)  # small, so that the test's tensors are read in several blocks
    dist.init_process_group("gloo")
    files = weight_files(directory)
    model = empty_target(directory, torch.float32)
    before = status_kib("VmRSS") * 1024
    read = sharding.load_sharded_target(model, files, dist.group.WORLD, torch.device("cpu"))
    peak = status_kib("VmHWM") * 1024
    held, whole = sharding.weight_bytes(model)
    with torch.no_grad():
        hidden, final = sharding.hidden_states(model.model, torch.arange(3, 40)[None])
        with sharding.gathered_weight(model.get_output_embeddings()) as head:
            logits = final @ head.T
    rank = dist.get_rank()
    if rank == 0:
        torch.save({"hidden": [h.clone() for h in hidden], "logits": logits}, Path(out) / "outputs.pt")
    record = {"rss_before": before, "peak_rss": peak, "read_bytes": read["read_bytes"], "held": held, "whole": whole}
    (Path(out) / f"{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
