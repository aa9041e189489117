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


def save_tiny_chat_target(directory, hidden_size: int, layers: int, **config):
    """A random Llama (seed 0; 4 query, 2 key/value heads) with the default target's tokenizer and
    chat template, saved in ``directory``: a target the training loop runs in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from torchspec_ext.target import default_target_dir

    tokenizer = AutoTokenizer.from_pretrained(default_target_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
