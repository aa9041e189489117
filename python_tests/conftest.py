import pytest
import torch

import torchspec_ext

HAS_CUDA_BUILD = torchspec_ext.build_info()["cuda"]
HAS_GPU = torch.cuda.is_available() and HAS_CUDA_BUILD

# Every test that takes a `device` runs on the CPU and, where a GPU and a CUDA build exist, on it.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
