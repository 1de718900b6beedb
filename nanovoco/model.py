"""The model VoCo-LLaMA trains, a plain LLaVA-1.5: a LLaMA decoder, a CLIP ViT vision tower and LLaVA's projector,
in plain PyTorch.

Mirrors HF transformers' `LlamaForCausalLM` and `CLIPVisionModel` and LLaVA-1.5's `mm_projector`, with HF's
parameter names inside each module so that loading a checkpoint is renaming (the key maps live in formats.py).
VoCo-LLaMA (arXiv 2406.12275) adds no module of its own: its VoCo tokens are ordinary vocabulary tokens, and the
compression comes from the attention mask that training feeds to every layer (voco.py). So everything here takes an
explicit boolean mask and explicit position ids, and all attention goes through `F.scaled_dot_product_attention`;
the two-stage inference that the mask makes possible is voco_cache.py, on top of this module.

Reading order: LLaMA (RMSNorm, RoPE, attention, MLP, decoder), CLIP vision tower, projector, the VLM.
Configs: config.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from nanovoco import checkpoint, formats
from nanovoco.baselines import COMPRESSORS
from nanovoco.config import CLIPVisionConfig, LlamaConfig, VoCoLlamaConfig

# A KV cache is a plain list with one (k, v) pair per decoder layer, each (B, n_kv_heads, L_cached, head_dim).
# Keys are stored *after* RoPE, so a cached key carries the position it was computed at.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Output:
    logits: torch.Tensor  # (B, L, vocab); (n, vocab) for the n positions of logits_at
    cache: KVCache | None  # the keys/values of the cached tokens followed by those of this call's tokens


@dataclass
class StaticKV:
    """One layer's keys and values in preallocated buffers (B, n_kv_heads, max_len, head_dim), for generation's fast
    path (generate.static_decoder, as gpt-fast does): a call writes its new keys and values at `slots` (L,) and
    attends over all max_len slots under its mask, so that every decode step has the same shapes and compiles once."""
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor


def check_token_ids(ids, vocab_size: int, argument: str, ndim: int = 2, allowed=()):
    """Token ids as a public API's argument: an integer tensor of ndim dimensions ((batch, length) by default), every
    id in the vocabulary or one of `allowed` (the image placeholder). Without this, a list, a float tensor or an
    id past the vocabulary fails deep inside the embedding, in words about its C++ arguments."""
    shape = "(batch, length)" if ndim == 2 else "(length,)"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{argument} takes a tensor of token ids {shape}, not a {type(ids).__name__}: e.g. "
                        f"torch.tensor({'[ids]' if ndim == 2 else 'ids'})")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{argument} takes integer token ids, not {ids.dtype}: e.g. ids.long()")
    if ids.ndim != ndim:
        raise ValueError(f"{argument} must be {shape}, got shape {tuple(ids.shape)}"
                         + (": one question is ids[None]" if ndim == 2 and ids.ndim == 1 else ""))
    if ids.numel() == 0:
        raise ValueError(f"{argument} holds no tokens (shape {tuple(ids.shape)}): there is nothing to go on from")
    bad = (ids < 0) | (ids >= vocab_size)
    for i in allowed:
        bad &= ids != i
    if bad.any():
        raise ValueError(f"{argument} holds the id {int(ids[bad][0])}, outside the model's vocabulary "
                         f"(0..{vocab_size - 1}): encode the text with the model's own tokenizer")


def check_length(last_position: int, max_new_tokens: int, limit: int):
    """A prompt whose last position is last_position, + max_new_tokens, must fit in the model's context."""
    if last_position + 1 + max_new_tokens > limit:
        raise ValueError(f"a prompt that reaches position {last_position} + max_new_tokens={max_new_tokens} exceeds "
                         f"the model's context of {limit} positions: shorten the prompt (or the video) or lower "
                         f"max_new_tokens")


# ----------------------------------------------------------------------------------------------------------------
# LLaMA

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 squares lose too much), scale in the input dtype, as HF LLaMA does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids, config: LlamaConfig, dtype):
    """cos/sin of the rotary embedding for explicit positions: (B, L) -> two (B, L, head_dim) tensors.

    Positions are passed in rather than derived from the sequence length because VoCo-LLaMA's second stage
    continues *after* tokens that are no longer in the cache (the vision tokens): text keeps its original positions.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=position_ids.device).float() / d))
    inv_freq = inv_freq / config.rope_linear_factor  # linear scaling stretches every wavelength by the factor
    freqs = position_ids[..., None].float() * inv_freq  # (B, L, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # HF layout: the two halves of a head are the rotated pairs
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate (B, H, L, D) by position; HF's rotate_half convention (weights are stored for it)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_mask(L: int, past: int, device) -> torch.Tensor:
    """(1, 1, L, past + L) bool: the new tokens see every cached key and the new keys up to themselves."""
    return torch.ones(L, past + L, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past_kv=None):
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(past_kv, StaticKV):  # the fast path: into the preallocated slots, then attend over all
            past_kv.k.index_copy_(2, past_kv.slots, k)
            past_kv.v.index_copy_(2, past_kv.slots, v)
            k, v = past_kv.k, past_kv.v
        elif past_kv is not None:  # cached keys are already rotated at their own positions: just prepend them
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        # mask: (B or 1, 1, L, L_past + L) bool, True = may attend; None = plain causal with nothing cached, where
        # SDPA's own causal kernels beat a materialised mask. GQA: each KV head serves a group of query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(rearrange(y, "b h l d -> b l (h d)")), (k, v)


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, past_kv=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Llama(nn.Module):
    """LLaMA / Vicuna decoder with its LM head (HF LlamaForCausalLM)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # tied: the head reads embed_tokens.weight directly, so there is one tensor to load, shard and save
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)

    def forward(self, input_ids=None, inputs_embeds=None, attn_mask=None, position_ids=None,
                cache: KVCache | None = None, use_cache: bool = True, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> Output:
        """Logits for new tokens given as ids (B, L) or embeddings (B, L, D).

        attn_mask: bool (B or 1, 1, L, L_cached + L), True where a query may attend; default causal over cache+new.
        position_ids: (B, L) RoPE positions; default continues after the cache. Every query row must see at
        least one key (SDPA gives NaN or zeros for an empty row, depending on the kernel).
        use_cache=False returns no cache: training does not hold every layer's keys and values (which activation
        checkpointing would otherwise keep alive). last_only: logits of the last position only, all that generation
        needs from a prompt (the head is the largest matmul per token at a small hidden size). logits_at: bool
        (B, L), logits of those positions only, flattened to (n, vocab): training's loss needs the answers' alone.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        past = 0 if cache is None or isinstance(cache[0], StaticKV) else cache[0][0].shape[2]  # static: explicit
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=x.device).expand(B, L)
        if attn_mask is None and past:
            attn_mask = causal_mask(L, past, x.device)
        cos, sin = rope_cos_sin(position_ids, self.config, x.dtype)
        new_cache = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, attn_mask, None if cache is None else cache[i])
            if use_cache:
                new_cache.append(kv)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[logits_at]
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return Output(logits=F.linear(x, head), cache=new_cache)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> Llama:
        """Load an HF LlamaForCausalLM directory (config.json + safetensors or .bin, sharded or not)."""
        ckpt = checkpoint.Checkpoint(path)
        formats.require_kind(ckpt, "llama")
        config = LlamaConfig(**formats.llama_config(ckpt.config, ckpt.config_file))
        return checkpoint.load(cls, config, [(ckpt, formats.llama_keys(config), formats.LLAMA_UNUSED)], dtype,
                               device)

    def save_pretrained(self, path):
        """Write config.json + model.safetensors in HF LlamaForCausalLM layout (loadable by transformers too)."""
        checkpoint.save(path, formats.llama_hf_config(self.config), self.state_dict(),
                        formats.llama_keys(self.config))

    def resize_vocab(self, vocab_size: int):
        """Grow the vocabulary for added tokens (VoCo-LLaMA's <voco>): new embedding and head rows are drawn from
        N(0, 0.02), transformers' default init for new rows when the official code was written."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"resize_vocab only grows the vocabulary ({old} -> {vocab_size} requested)")
        for name in ("embed_tokens", "lm_head"):
            module = getattr(self, name)
            if module is not None:
                rows = torch.randn(vocab_size - old, self.config.hidden_size, dtype=module.weight.dtype,
                                   device=module.weight.device) * 0.02
                module.weight = nn.Parameter(torch.cat([module.weight.data, rows]))
        self.config.vocab_size = vocab_size


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT vision tower (HF CLIPVisionModel, pre-LayerNorm transformer with quick_gelu)

class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", d=self.head_dim) for p in (self.q_proj, self.k_proj,
                                                                                        self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no mask
        return self.out_proj(rearrange(y, "b h n d -> b n (h d)"))


class CLIPLayer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as OpenAI's CLIP was trained


class CLIPVisionTower(nn.Module):
    """Image -> patch features of one hidden layer, the way LLaVA reads CLIP (no final LayerNorm, no pooling)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(c.num_patches + 1, c.hidden_size))  # learned, CLS first
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: HF's spelling
        self.layers = nn.ModuleList(CLIPLayer(c) for _ in range(c.num_layers_run))

    def forward(self, pixel_values):
        """pixel_values (B, 3, H, W), CLIP-normalised -> features (B, N, C): N = patches (+ CLS for cls_patch)."""
        c = self.config
        if pixel_values.shape[1:] != (3, c.image_size, c.image_size):
            raise ValueError(f"pixel_values must be (B, 3, {c.image_size}, {c.image_size}), got "
                             f"{tuple(pixel_values.shape)}: resize/crop the image to the vision tower's size first")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        x = rearrange(x, "b c h w -> b (h w) c")
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.position_embedding
        x = self.pre_layrnorm(x)  # this is HF's hidden_states[0]
        for layer in self.layers:  # after layer i this is hidden_states[i + 1]
            x = layer(x)
        return x[:, 1:] if c.select_feature == "patch" else x

    @classmethod
    def from_pretrained(cls, path, select_layer=-2, select_feature="patch", dtype=None, device=None):
        """Load the vision part of an HF CLIPVisionModel or CLIPModel directory (the text part is ignored)."""
        ckpt = checkpoint.Checkpoint(path)
        formats.require_kind(ckpt, "clip")
        config = CLIPVisionConfig(**formats.clip_config(ckpt.config, ckpt.config_file),
                                  select_layer=select_layer, select_feature=select_feature)
        prefix = formats.clip_prefix(ckpt)
        part = (ckpt, formats.clip_keys(config, prefix), formats.clip_unused(config, prefix))
        return checkpoint.load(cls, config, [part], dtype, device)


# ----------------------------------------------------------------------------------------------------------------
# Projector: vision features -> LLM embeddings (LLaVA's mm_projector)

class Projector(nn.Module):
    def __init__(self, kind: str, vision_dim: int, text_dim: int):
        super().__init__()
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector type {kind!r} is not supported: use 'linear' or 'mlp2x_gelu'")
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim) if kind == "mlp2x_gelu" else None

    def forward(self, x):
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))


# ----------------------------------------------------------------------------------------------------------------
# The VLM: image -> vision features -> projector -> embeddings in place of the image placeholders -> LLaMA

class VoCoLlama(nn.Module):
    """LLaVA-1.5-shaped VLM: the VoCo tokens, their mask (voco.py) and the two-stage inference (voco_cache.py) build
    on it, from outside."""

    def __init__(self, config: VoCoLlamaConfig):
        super().__init__()
        self.config = config
        self.vision = CLIPVisionTower(config.vision)
        self.projector = Projector(config.projector_type, config.vision.hidden_size, config.text.hidden_size)
        # the baselines compress the tower's features, before the projector, as LLaMA-VID averages its encoder's
        # tokens and BLIP-2's Q-Former reads its frozen encoder (after a trainable MLP, an average is a set encoder)
        self.compressor = None if config.compressor == "none" else COMPRESSORS[config.compressor](
            config.vision.hidden_size, config.compressor_tokens)
        self.llm = Llama(config.text)

    def embed(self, input_ids, pixel_values=None):
        """(B, L) ids with num_image_tokens placeholders per image -> (B, L, D) embeddings.

        Images fill the placeholders in reading order (row by row through the batch). Placeholders are expanded in
        input_ids already (not by the model), so every token has its final position before the forward pass, which
        is what an explicit attention mask and explicit position ids need.
        """
        if pixel_values is not None and not (isinstance(pixel_values, torch.Tensor)
                                             and pixel_values.dtype.is_floating_point):
            raise TypeError(f"pixel_values must be a float tensor (n_images, 3, H, W), as image.preprocess makes it, "
                            f"not {getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (n_images, 3, H, W), got {tuple(pixel_values.shape)}")
        check_token_ids(input_ids, self.config.text.vocab_size, "input_ids", allowed=(self.config.image_token_id,))
        is_image = input_ids == self.config.image_token_id
        x = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if is_image.sum() != n_images * self.config.num_image_tokens:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image placeholder tokens, but {n_images} image(s)"
                             f" x {self.config.num_image_tokens} features were given: expand each <image> to "
                             f"{self.config.num_image_tokens} placeholder ids, one image per <image>")
        if n_images:
            features = self.vision(pixel_values)  # (n_images, N, D_vision)
            if self.compressor is not None:
                features = self.compressor(features)  # (n_images, K, D_vision)
            features = self.projector(features)  # (n_images, N or K, D)
            x = x.masked_scatter(is_image[..., None], features.to(x.dtype))
        return x

    def forward(self, input_ids, pixel_values=None, attn_mask=None, position_ids=None, cache=None,
                use_cache=True, logits_at=None) -> Output:
        return self.llm(inputs_embeds=self.embed(input_ids, pixel_values), attn_mask=attn_mask,
                        position_ids=position_ids, cache=cache, use_cache=use_cache, logits_at=logits_at)

    @classmethod
    def from_pretrained(cls, path, vision_path=None, projector_path=None, dtype=None, device=None, num_voco=None,
                        voco_token_id=None) -> VoCoLlama:
        """Load the VLM from any of the layouts people have (formats.vlm_parts says which and how):

        - LLaVA-1.5 / VoCo-LLaMA training output (LLaMA keys + model.mm_projector.*; CLIP from vision_path or the
          config's mm_vision_tower when that is a local directory);
        - HF LlavaForConditionalGeneration (language_model.*, vision_tower.*, multi_modal_projector.*);
        - a LLaMA/Vicuna directory + vision_path (CLIP) + projector_path (LLaVA's stage-1 mm_projector.bin).

        num_voco and voco_token_id override config.json's VoCo settings (formats.vlm_parts).
        """
        config, parts = formats.vlm_parts(path, vision_path, projector_path, VoCoLlamaConfig.from_dicts,
                                          num_voco, voco_token_id)
        return checkpoint.load(cls, config, parts, dtype, device)

    def save_pretrained(self, path):
        """Write LLaVA-1.5's layout (+ the CLIP in path/vision_tower), which from_pretrained loads back."""
        formats.save_vlm(path, self.config, self.state_dict())
