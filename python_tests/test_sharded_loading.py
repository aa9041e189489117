"""A target read sharded (torchspec_ext.sharding.load_sharded_target): each rank of a gloo job reads
only its slices of a checkpoint written in several safetensors files, holds half of it, and runs it
as the target loaded whole does; and the checks of the checkpoint's files (missing, truncated, or
in a format that cannot be read a slice at a time)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchspec_ext.target import empty_target, load_target, source_names, weight_files

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHUNK = 1 << 20  # the workers read in blocks of 1 MiB: the test's tensors (up to 16 MiB) in several


def save_llama(directory: Path, hidden: int, layers: int, vocab: int, max_shard_size: str | None = None, **config):
    """A random Llama (seed 0) saved by save_pretrained, in files of at most ``max_shard_size``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        **config,
    )
    torch.manual_seed(0)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    LlamaForCausalLM(config).save_pretrained(directory, **extra)
    return directory


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """An untied 8-layer Llama of 142 MB (float32) in 4 safetensors files with their index."""
    return save_llama(tmp_path_factory.mktemp("ckpt"), hidden=512, layers=8, vocab=8192, max_shard_size="40MB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_reads_only_its_half_and_runs_as_the_whole_target(sharded_checkpoint, tmp_path):
    files = weight_files(sharded_checkpoint)
    assert len(files) == 4
    world, port = 2, _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
        )  # fmt: skip
        worker = [sys.executable, str(HERE / "sharded_loading_worker.py"), str(sharded_checkpoint), str(tmp_path)]
        worker.append(str(CHUNK))
        procs.append(subprocess.Popen(worker, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)

    whole = sum(f.stat().st_size for f in files)  # float32 checkpoint: the weights, and small headers
    for rank in range(world):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        # Every tensor's rows split in two: each rank reads and holds exactly half of the weights.
        assert got["held"] * 2 == got["whole"] and got["read_bytes"] == got["held"]
        assert got["whole"] == pytest.approx(whole, rel=1e-3)
        # The bound docs/training.md states: the rank's shards, one block of rows in flight twice
        # (its mapped pages and the tensor read from them), and allocator slack; a rank reading
        # the whole target would need 71 MB more.
        grew = got["peak_rss"] - got["rss_before"]
        assert grew <= got["held"] + 2 * CHUNK + 16 * 2**20, (grew, got)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(sharded_checkpoint, dtype=torch.float32)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        out = reference.model(ids, output_hidden_states=True)
        logits = reference.lm_head(out.last_hidden_state)
    got = torch.load(tmp_path / "outputs.pt")
    assert len(got["hidden"]) == len(out.hidden_states)
    for mine, theirs in zip(got["hidden"], out.hidden_states):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=0)


def test_a_missing_or_truncated_file_is_named(tmp_path):
    directory = save_llama(tmp_path / "t", hidden=64, layers=2, vocab=512, max_shard_size="100KB")
    files = weight_files(directory)
    assert len(files) > 2
    victim = files[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=f"{victim}.*truncated or damaged"):
        weight_files(directory)
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim} is missing .*1 of the {len(files)} files"):
        weight_files(directory)


def test_targets_that_cannot_be_read_in_slices_are_refused_with_the_conversion(tmp_path):
    gguf = tmp_path / "g" / "model-Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    convert = "python -m torchspec_ext.target convert"
    with pytest.raises(ValueError, match=f"is a GGUF file.*{convert} {gguf} OUT_DIR"):
        weight_files(gguf)
    with pytest.raises(ValueError, match=f"holds a GGUF target .*{convert} {gguf}"):
        weight_files(gguf.parent)
    with pytest.raises(FileNotFoundError, match=f"GGUF file.*{convert}"):
        load_target(gguf)
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=f"PyTorch pickles .*{convert} {pickled} OUT_DIR"):
        weight_files(pickled)


def test_a_tied_head_is_read_under_whichever_name_the_checkpoint_kept(tmp_path):
    directory = save_llama(tmp_path / "t", hidden=64, layers=2, vocab=512, tie_word_embeddings=True)
    model = empty_target(directory, torch.float32)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # save_pretrained keeps the embedding's name; safetensors' save_model (the default target) the head's.
    for kept, dropped in [
        ("model.embed_tokens.weight", "lm_head.weight"),
        ("lm_head.weight", "model.embed_tokens.weight"),
    ]:
        sources = source_names(model, names - {dropped})
        assert sources[kept] == sources[dropped] == kept
    with pytest.raises(ValueError, match="lacks 2 of the model's tensors .*model.norm.weight"):
        source_names(model, names - {"model.norm.weight", "model.layers.0.mlp.up_proj.weight"})
