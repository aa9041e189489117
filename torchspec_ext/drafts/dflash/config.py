"""A DFlash / DSpark draft's shape, and its config.json as SGLang's, vLLM's and z-lab's loaders read it
(DSpark's as SpecForge writes it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torchspec_ext.drafts.dflash.options import DFlashOptions
from torchspec_ext.drafts.layers import rope_theta

DFLASH_ARCHITECTURE = "DFlashDraftModel"
DSPARK_ARCHITECTURE = "DSparkDraftModel"
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


def default_target_layers(num_layers: int, count: int) -> list[int]:
    """The published choice of target layers (z-lab's ``build_target_layer_ids``), as our feature
    layers: Hugging Face ``hidden_states`` indices, which are SGLang's layer ids plus one."""
    if count == 1:
        return [num_layers // 2 + 1]
    start, end = 1, num_layers - 3
    if end < start:
        start, end = 0, max(0, num_layers - 2)
    return [int(round(start + i * (end - start) / (count - 1))) + 1 for i in range(count)]


@dataclass
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's: the draft predicts over all of it
    num_hidden_layers: int
    block_size: int
    mask_token_id: int
    feature_layers: list[int] = field(default_factory=list)  # Hugging Face hidden_states indices
    target_num_layers: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # full_attention / sliding_attention per layer
    sample_from_anchor: bool = False  # DSpark: slot k predicts anchor + k + 1
    markov_rank: int = 0  # DSpark's previous-token bias (0: none)
    confidence_head: bool = False  # DSpark's acceptance head (on [hidden, markov embedding])

    def __post_init__(self):
        if not self.layer_types:
            kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
            self.layer_types = [kind] * self.num_hidden_layers

    @property
    def is_dspark(self) -> bool:
        return self.sample_from_anchor

    @property
    def proposals(self) -> int:
        """Tokens one block forward proposes."""
        return self.block_size if self.sample_from_anchor else self.block_size - 1

    @staticmethod
    def from_target(config, options: DFlashOptions, mask_token_id: int, dspark: bool) -> DFlashConfig:
        heads = config.num_attention_heads
        return DFlashConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", heads) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            num_hidden_layers=options.draft_layers,
            block_size=options.block_size,
            mask_token_id=mask_token_id,
            feature_layers=default_target_layers(config.num_hidden_layers, options.draft_layers),
            target_num_layers=config.num_hidden_layers,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=rope_theta(config),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=options.sliding_window,
            sample_from_anchor=dspark,
            markov_rank=getattr(options, "markov_rank", 0) if dspark else 0,
            confidence_head=dspark,
        )

    def to_hf(self, dtype: str = "float32", private: bool = True) -> dict:
        """The config.json SGLang's and vLLM's ``DFlashDraftModel`` (z-lab's layout) read; DSpark's as
        SpecForge's ``DSparkDraftModel`` writes it. ``dflash_config.target_layer_ids`` counts as SGLang
        and z-lab count (the output of layer ``i``: our feature layer minus one); vLLM adds one back,
        and reads ``eagle_aux_hidden_state_layer_ids`` (our count) first."""
        dflash = {"target_layer_ids": [i - 1 for i in self.feature_layers], "mask_token_id": self.mask_token_id}
        config = {
            "architectures": [DSPARK_ARCHITECTURE if self.is_dspark else DFLASH_ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "num_target_layers": self.target_num_layers,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "block_size": self.block_size,
            "eagle_aux_hidden_state_layer_ids": list(self.feature_layers),
            "torch_dtype": dtype,
            "dflash_config": dflash,
        }
        if self.is_dspark:
            heads = {
                "projector_type": "dspark",
                "attention_mode": "gqa" if self.num_key_value_heads < self.num_attention_heads else "mha",
                "sample_from_anchor": True,
                "markov_rank": self.markov_rank,
                "markov_head_type": "vanilla",
                "enable_confidence_head": self.confidence_head,
                "confidence_head_with_markov": self.confidence_head and self.markov_rank > 0,
            }
            dflash.update(heads)
            config.update(heads)
        if private:
            config["torchspec_ext"] = asdict(self)
        return config

    @staticmethod
    def from_hf(config: dict) -> DFlashConfig:
        if "torchspec_ext" in config:
            return DFlashConfig(**config["torchspec_ext"])
        dflash = config.get("dflash_config") or {}
        layers = config["num_hidden_layers"]
        target_layers = dflash.get("num_target_layers", config.get("num_target_layers")) or 0
        if config.get("eagle_aux_hidden_state_layer_ids"):
            feature_layers = list(config["eagle_aux_hidden_state_layer_ids"])
        elif dflash.get("target_layer_ids") is not None:
            feature_layers = [i + 1 for i in dflash["target_layer_ids"]]
        elif target_layers:
            feature_layers = default_target_layers(target_layers, layers)
        else:
            raise KeyError("dflash_config.target_layer_ids (and no num_target_layers to choose them from)")
        mask = dflash.get("mask_token_id", config.get("mask_token_id"))
        if mask is None:
            raise KeyError("dflash_config.mask_token_id")
        dspark = DSPARK_ARCHITECTURE in (config.get("architectures") or [])
        get = lambda key, default: dflash.get(key, config.get(key, default))
        rope = config.get("rope_parameters") or {}
        heads = config["num_attention_heads"]
        layer_types = config.get("layer_types") or []
        sliding = config.get("sliding_window") if SLIDING_ATTENTION in layer_types else None
        return DFlashConfig(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            num_hidden_layers=layers,
            block_size=int(dflash.get("block_size", config.get("block_size", 16))),
            mask_token_id=int(mask),
            feature_layers=feature_layers,
            target_num_layers=target_layers,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            sliding_window=sliding,
            layer_types=list(layer_types) or [FULL_ATTENTION] * layers,
            sample_from_anchor=bool(get("sample_from_anchor", dspark)),
            markov_rank=int(get("markov_rank", 0) or 0) if dspark else 0,
            confidence_head=bool(get("enable_confidence_head", dspark)) if dspark else False,
        )
