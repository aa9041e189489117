"""``--cache-teacher DIR``: the teacher's batches as safetensors shards and a manifest, written
once and read by later runs (and by the teacher ranks of a torchrun job)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torchspec_ext import atomic
from torchspec_ext.teacher import BatchError, TeacherBatch
from torchspec_ext.training.errors import TrainError
from torchspec_ext.training.streams import Passes, TeacherStream

MANIFEST = "manifest.json"
FORMAT = "torchspec_ext teacher cache 1"


def cache_identity(target_dir: Path, target_dtype: str, topk: int, feature_layers, draft_to_target) -> dict:
    """What a teacher cache must agree on with the run that reads it."""
    return {
        "target": str(target_dir.resolve()),
        "target_dtype": target_dtype,
        "topk": topk,
        "feature_layers": list(feature_layers),
        "draft_vocab": draft_to_target.tolist(),
    }


def read_manifest(directory: Path, identity: dict) -> dict | None:
    """The manifest of the complete cache in ``directory`` (None when there is none yet); a
    TrainError when it was made for another target, top-k or draft vocabulary, or lost a shard."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise TrainError(f"--cache-teacher {directory}: {path} is not a teacher cache manifest of this version")
    for key, want in identity.items():
        if manifest.get(key) != want:
            shown = "differs" if key == "draft_vocab" else f"{manifest.get(key)!r}, this run {want!r}"
            raise TrainError(
                f"--cache-teacher {directory}: the cache was made with another {key} ({shown}); "
                "use another directory, or delete this one to rebuild it"
            )
    missing = [name for name in manifest["files"] if not (directory / name).is_file()]
    if missing:
        raise TrainError(
            f"--cache-teacher {directory}: {len(missing)} shard(s) of the manifest are missing "
            f"(e.g. {missing[0]}); delete the directory to rebuild the cache"
        )
    return manifest


def write_cache(directory: Path, stream: TeacherStream, count: int, identity: dict) -> dict:
    """Runs the teacher over the first ``count`` batches, one safetensors shard per batch (each
    written whole or not at all), then the manifest, last: a cache without a manifest is
    incomplete and is rebuilt."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    files = []
    for i in range(count):
        name = f"batch-{i:06d}.safetensors"
        with atomic.staged(directory / name) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in stream.batch(i).tensors().items()}, str(tmp))
        files.append(name)
    print(f"[train] teacher cache: wrote {count} batches", file=sys.stderr)
    manifest = {"format": FORMAT, "count": count, "files": files, **identity}
    atomic.write_text(directory / MANIFEST, json.dumps(manifest))
    return manifest


def read_shard(path: Path, device) -> TeacherBatch:
    """One cached batch, checked; a TrainError naming the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return TeacherBatch.from_tensors(load_file(str(path), device=str(device)), str(path))
    except (SafetensorError, BatchError, OSError) as exc:
        raise TrainError(
            f"--cache-teacher: {path} is damaged ({exc}); delete the cache directory to rebuild it"
        ) from None


def cached_passes(directory: Path, manifest: dict, seed: int, device) -> Passes:
    """The passes over a cache: teacher batch ``j`` is its ``j``-th shard."""
    files = manifest["files"]
    return Passes(len(files), seed, lambda j: read_shard(directory / files[j], device))


def open_cache(
    directory: Path, identity: dict, stream: TeacherStream, count: int, seed: int, device, may_write: bool
) -> Passes:
    """The passes over the cache in ``directory``, after writing its ``count`` batches when it is
    not complete (only where ``may_write``: a single-process run)."""
    manifest = read_manifest(directory, identity)
    if manifest is None:
        if not may_write:
            raise TrainError(
                f"--cache-teacher {directory}: no complete cache there; under torchrun the teacher "
                "ranks serve an existing cache: build it first with a single-process run"
            )
        print(f"[train] teacher cache: writing {count} batches to {directory}", file=sys.stderr)
        manifest = write_cache(directory, stream, count, identity)
    else:
        print(
            f"[train] teacher cache: {manifest['count']} batches from {directory}; the target is not run for training",
            file=sys.stderr,
        )
    return cached_passes(directory, manifest, seed, device)
