"""Configs of the VoCo-LLaMA model as dataclasses, with named presets.

Field names follow HF's config.json (LlamaConfig, CLIPVisionConfig) and LLaVA's (mm_projector_type,
mm_vision_select_layer, ...), so that reading a checkpoint's config is a lookup (formats.py does the reading).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads: grouped-query attention
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # HF rope_scaling {"type": "linear", "factor": f}: positions are divided by f
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (query heads share KV heads in groups)")


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # LLaVA's mm_vision_select_layer: index into HF's hidden_states (0 = embeddings)
    select_feature: str = "patch"  # "patch": drop CLS as LLaVA-1.5 does; "cls_patch": keep it

    def __post_init__(self):
        n = self.num_hidden_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"select_layer={self.select_layer} is out of range for a CLIP with {n} layers: "
                             f"use -{n + 1}..{n} (an index into hidden_states, 0 = the embeddings)")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature={self.select_feature!r} is not supported: use 'patch' or 'cls_patch'")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_layers_run(self) -> int:
        """Layers needed to reach hidden_states[select_layer]: the ones after it are never computed."""
        return self.select_layer % (self.num_hidden_layers + 1)


@dataclass
class VoCoLlamaConfig:
    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projector_type: str = "mlp2x_gelu"  # LLaVA's mm_projector_type: "linear" or "mlp2x_gelu"
    image_token_id: int = -200  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder id, replaced before embedding
    # VoCo-LLaMA: the <voco> token (an ordinary vocabulary entry, id 32000 on Vicuna) and how many of them follow
    # each image. They change no module: only the sequence layout and the attention mask (voco.py).
    voco_token_id: int = -1
    num_voco: int = 0
    # The paper's baselines: an external compressor (baselines.py) that shrinks each image to compressor_tokens
    compressor: str = "none"  # "none", "avgpool" or "qformer" (baselines.COMPRESSORS)
    compressor_tokens: int = 0

    def __post_init__(self):
        if self.num_voco < 0:
            raise ValueError(f"num_voco={self.num_voco} must be >= 0")
        if self.num_voco and not 0 <= self.voco_token_id < self.text.vocab_size:
            raise ValueError(f"num_voco={self.num_voco} needs voco_token_id, the id of <voco> in the vocabulary of "
                             f"{self.text.vocab_size}, got {self.voco_token_id}")
        if self.compressor not in ("none", "avgpool", "qformer"):
            raise ValueError(f"compressor={self.compressor!r} is not supported: use 'none', 'avgpool' or 'qformer'")
        if self.compressor != "none" and self.compressor_tokens < 1:
            raise ValueError(f"compressor={self.compressor!r} needs compressor_tokens >= 1")

    @classmethod
    def from_dicts(cls, text: dict, vision: dict, **rest) -> VoCoLlamaConfig:
        return cls(text=LlamaConfig(**text), vision=CLIPVisionConfig(**vision), **rest)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder ids per image in input_ids: each is replaced by one projected (compressed) vision feature."""
        if self.compressor != "none":
            return self.compressor_tokens
        return self.vision.num_patches + (self.vision.select_feature == "cls_patch")


PRESETS = ("tiny", "tiny-mha", "llava-7b")


def preset(name: str, vocab_size: int = 32000) -> VoCoLlamaConfig:
    """Named shapes. 'llava-7b': Vicuna-7B + CLIP ViT-L/14-336 (576 patches), the paper's model. 'tiny': a few
    million parameters that train and generate on a laptop CPU in seconds, with grouped-query attention (4 query
    heads, 2 KV heads) as LLaMA-2-70B and LLaMA-3 have. 'tiny-mha': the same with 4 KV heads, the repro's LLM: with
    two KV heads a layer has two ways to look up the image, and it learned the synthetic VQA markedly slower
    (docs/results.md)."""
    if name == "llava-7b":
        return VoCoLlamaConfig(text=LlamaConfig(vocab_size=vocab_size))
    if name in ("tiny", "tiny-mha"):
        return VoCoLlamaConfig(
            text=LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2 if name == "tiny" else 4,
                             max_position_embeddings=512),
            vision=CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                                    image_size=56, patch_size=14))  # 4 x 4 = 16 patches: one per synthetic grid cell
    raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
