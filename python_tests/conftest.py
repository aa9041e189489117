import json
import math

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


def scale_layer_outputs(directory, factor: float) -> None:
    """Scales what each decoder layer writes into the residual stream (``o_proj``, ``down_proj``) of
    the model saved in ``directory``. With tied embeddings and ``factor`` 0.5 the target mostly
    repeats what it was given: a draft learns it in a few steps, so acceptance lengths are above 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(directory)


REPLIES = [
    "The capital of France is Paris.",
    "Two plus two is four, and four plus four is eight.",
    "A speculative decoder drafts tokens that the target verifies in one pass.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


def write_chat(path, count=16):
    """``count`` one-question chats (ShareGPT form) in ``path``."""
    records = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}: tell me something."},
                {"from": "gpt", "value": REPLIES[i % len(REPLIES)]},
            ]
        }
        for i in range(count)
    ]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    """A 6-layer Llama with the default target's tokenizer (and chat template)."""
    return save_tiny_chat_target(tmp_path_factory.mktemp("tiny_target"), hidden_size=48, layers=6)


@pytest.fixture(scope="session")
def predictable_target(tmp_path_factory):
    """The tiny target with tied embeddings and its layers at half strength (see scale_layer_outputs)."""
    directory = save_tiny_chat_target(
        tmp_path_factory.mktemp("predictable_target"), hidden_size=48, layers=6, tie_word_embeddings=True
    )
    scale_layer_outputs(directory, 0.5)
    return directory


@pytest.fixture
def chat_file(tmp_path):
    """16 short chats in tmp_path/chat.json."""
    return write_chat(tmp_path / "chat.json")


# A few-second training run of the tiny target on 16 chats.
SMALL = (
    "--batch-size 2 --max-length 64 --draft-vocab 4096 --topk 32 --ttt-steps 2 --eval-prompts 1 --eval-new-tokens 8 "
    "--eval-interval 0 --held-out 0.2 --warmup-steps 1 --target-dtype float32"
).split()


def tiny_argv(target, tmp_path, *extra, log_interval=1):
    """``python -m torchspec_ext.train``'s arguments for a :data:`SMALL` run of ``target`` on 16 chats,
    output in tmp_path/out."""
    data = write_chat(tmp_path / "chat.json")
    paths = ["--target", str(target), "--data", str(data), "--output-dir", str(tmp_path / "out")]
    return [*paths, *SMALL, "--log-interval", str(log_interval), *extra]


def run_train(target, tmp_path, *extra) -> int:
    from torchspec_ext import train

    return train.main(tiny_argv(target, tmp_path, *extra))


def chi_square_p_value(counts, probs):
    """Upper-tail p-value of Pearson's chi-square statistic for observed counts against
    probabilities, by the Wilson–Hilferty approximation: (X²/df)^(1/3) is close to normal with
    mean 1 - 2/(9 df) and variance 2/(9 df) (accurate to a few percent of p in the tail for
    df >= 3, ample for a threshold of 1e-3 against statistics that are either O(df) or huge)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a category of probability 0 was observed"
    expected = n * probs[keep]
    assert expected.min() >= 5, "too few expected counts for the chi-square approximation"
    stat = ((counts[keep] - expected) ** 2 / expected).sum().item()
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square_of_draws(draws, probs, least: float = 5.0) -> float:
    """chi_square_p_value of ``draws`` (category indices) against ``probs``, the categories expected
    fewer than ``least`` times merged into one (itself expected at least ``least`` times)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    counts = torch.bincount(torch.as_tensor(draws), minlength=len(probs)).double()
    rare = probs * len(draws) < least
    if probs[rare].sum() * len(draws) < least:  # too rare even together: fold them into the likeliest
        rare[probs.argmax()] = True
    return chi_square_p_value(torch.cat([counts[~rare], counts[rare].sum(0, keepdim=True)]),
                              torch.cat([probs[~rare], probs[rare].sum(0, keepdim=True)]))  # fmt: skip
