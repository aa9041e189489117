"""torchspec_ext: compiled kernels and an online training loop for speculative-decoding drafts.

Importing the package loads the compiled core, which registers the ops under
``torch.ops.torchspec``; the Python wrappers live in :mod:`torchspec_ext.ops`.
"""

import torch  # noqa: F401  (the compiled core links against torch's libraries)

try:
    from torchspec_ext import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "torchspec_ext's compiled core (torchspec_ext._C) is missing or was built against another torch: "
        "reinstall with `pip install --no-build-isolation -e .` (see README.md)"
    ) from exc

from torchspec_ext import ops  # noqa: E402,F401

__version__ = "0.1.0"


def build_info():
    """What this build contains: {'cuda': bool, 'nccl_version': int or None}."""
    return dict(_C.build_info())
