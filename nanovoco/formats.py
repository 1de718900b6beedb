"""Checkpoint formats: which layout a directory holds, HF config.json <-> nanovoco config fields, and the explicit
key maps.

Every format is a dict {nanovoco key: key on disk}, templated per layer, so a reader can see exactly which tensor
goes where; checkpoint.load applies a map strictly. The layouts: HF LLaMA, HF CLIP, HF LlavaForConditionalGeneration
(llava-hf), LLaVA-1.5's own (VoCo-LLaMA's training output, what nanovoco saves), and a plain LLaMA + CLIP + LLaVA's
stage-1 projector.
"""
from __future__ import annotations

import re
from pathlib import Path

from nanovoco.checkpoint import Checkpoint, save

LOADERS = {"llama": "Llama.from_pretrained", "clip": "CLIPVisionTower.from_pretrained",
           "llava-hf": "VoCoLlama.from_pretrained", "llava": "VoCoLlama.from_pretrained"}


def require_kind(ckpt: Checkpoint, *allowed) -> str:
    """What a checkpoint directory holds, judged from its config.json; an error when it is not one of `allowed`."""
    hf = ckpt.config
    if str(hf.get("model_type", "")).startswith("clip"):  # clip (CLIPModel) or clip_vision_model
        kind = "clip"
    elif "text_config" in hf:
        kind = "llava-hf"
    elif "mm_projector_type" in hf or "mm_vision_tower" in hf:
        kind = "llava"
    else:
        kind = "llama"
    if kind not in allowed:
        raise ValueError(f"{ckpt.config_file} describes a {kind} checkpoint (architectures="
                         f"{hf.get('architectures')}): load it with {LOADERS[kind]}")
    return kind


# ----------------------------------------------------------------------------------------------------------------
# Configs: HF config.json -> nanovoco config fields. Missing fields take HF's defaults, as transformers does.

def llama_config(hf: dict, file) -> dict:
    def unsupported(what):
        return ValueError(f"{file}: {what} is not supported by nanovoco's LLaMA (LLaMA/Vicuna architecture only)")

    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise unsupported("attention_bias/mlp_bias=true")
    # transformers 5 writes rope_parameters; released checkpoints (Vicuna, LLaVA-1.5) have rope_theta + rope_scaling
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e4)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise unsupported(f"rope type {rope_type!r} (only 'default' and 'linear')")
    heads = hf.get("num_attention_heads", 32)
    if heads % (hf.get("num_key_value_heads") or heads):
        raise ValueError(f"{file}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
                         f"{hf['num_key_value_heads']}: the config is inconsistent")
    eos = hf.get("eos_token_id", 2)
    return dict(vocab_size=hf.get("vocab_size", 32000), hidden_size=hf.get("hidden_size", 4096),
                intermediate_size=hf.get("intermediate_size", 11008),
                num_hidden_layers=hf.get("num_hidden_layers", 32), num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or 0,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", 1e4)),
                rope_linear_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id", 1),
                eos_token_id=eos[0] if isinstance(eos, list) else eos)


def llama_hf_config(c) -> dict:
    """nanovoco LlamaConfig -> config.json of HF LlamaForCausalLM (the older rope_theta/rope_scaling spelling,
    which both transformers 4 and 5 read)."""
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                rope_scaling=None if c.rope_linear_factor == 1.0 else {"type": "linear",
                                                                       "factor": c.rope_linear_factor},
                tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)


def clip_config(hf: dict, file) -> dict:
    hf = hf.get("vision_config", hf)  # a full CLIPModel config nests the vision part
    if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{file}: CLIP hidden_act={hf['hidden_act']!r} is not supported (OpenAI CLIP: quick_gelu)")
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"{file}: CLIP num_channels={hf['num_channels']} is not supported (RGB only)")
    return dict(hidden_size=hf.get("hidden_size", 768), intermediate_size=hf.get("intermediate_size", 3072),
                num_hidden_layers=hf.get("num_hidden_layers", 12),
                num_attention_heads=hf.get("num_attention_heads", 12), image_size=hf.get("image_size", 224),
                patch_size=hf.get("patch_size", 32), layer_norm_eps=hf.get("layer_norm_eps", 1e-5))


def clip_hf_config(c) -> dict:
    """The CLIPVisionModel config.json for the layers nanovoco keeps (see save_vlm)."""
    return dict(architectures=["CLIPVisionModel"], model_type="clip_vision_model", hidden_act="quick_gelu",
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers_run, num_attention_heads=c.num_attention_heads,
                image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=c.layer_norm_eps, num_channels=3)


# ----------------------------------------------------------------------------------------------------------------
# Key maps {nanovoco key: key on disk}. `ours` prefixes our side (e.g. "llm." inside the VLM).

LLAMA_LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


# Buffers that old checkpoints (e.g. Vicuna's .bin) saved although they are recomputed from the config.
LLAMA_UNUSED = (r".*rotary_emb\.inv_freq",)


def llama_keys(c, ours="", theirs="model.", head="lm_head.weight") -> dict:
    """HF LlamaForCausalLM: model.embed_tokens, model.layers.{i}.*, model.norm, lm_head (absent when tied)."""
    keys = {f"{ours}embed_tokens.weight": f"{theirs}embed_tokens.weight", f"{ours}norm.weight": f"{theirs}norm.weight"}
    for i in range(c.num_hidden_layers):
        for name in LLAMA_LAYER:
            keys[f"{ours}layers.{i}.{name}"] = f"{theirs}layers.{i}.{name}"
    if not c.tie_word_embeddings:
        keys[f"{ours}lm_head.weight"] = head
    return keys


CLIP_LAYER = {  # nanovoco CLIPLayer -> HF CLIPEncoderLayer (HF nests fc1/fc2 under mlp)
    **{f"self_attn.{p}.{w}": f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
       for w in ("weight", "bias")},
    **{f"{n}.{w}": f"{n}.{w}" for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")},
    **{f"{n}.{w}": f"mlp.{n}.{w}" for n in ("fc1", "fc2") for w in ("weight", "bias")},
}


def clip_keys(c, theirs: str, ours="") -> dict:
    """HF CLIP vision: {theirs}embeddings.*, {theirs}pre_layrnorm.*, {theirs}encoder.layers.{i}.*.

    theirs is "vision_model." in CLIPModel and older CLIPVisionModel files, "" in transformers-5 CLIPVisionModel
    files, "vision_tower.vision_model." or "vision_tower." inside llava-hf checkpoints.
    """
    keys = {f"{ours}patch_embedding.weight": f"{theirs}embeddings.patch_embedding.weight",
            f"{ours}class_embedding": f"{theirs}embeddings.class_embedding",
            f"{ours}position_embedding": f"{theirs}embeddings.position_embedding.weight",
            f"{ours}pre_layrnorm.weight": f"{theirs}pre_layrnorm.weight",
            f"{ours}pre_layrnorm.bias": f"{theirs}pre_layrnorm.bias"}
    for i in range(c.num_layers_run):
        for name, hf_name in CLIP_LAYER.items():
            keys[f"{ours}layers.{i}.{name}"] = f"{theirs}encoder.layers.{i}.{hf_name}"
    return keys


def clip_unused(c, theirs: str) -> tuple:
    """CLIP keys that are deliberately not loaded: LLaVA reads hidden_states[select_layer], so the layers after it
    and the final post_layernorm never run; a full CLIPModel also carries the text tower and the projections."""
    p = re.escape(theirs)
    after = "|".join(str(i) for i in range(c.num_layers_run, c.num_hidden_layers)) or "-"
    return (rf"{p}post_layernorm\..*", rf"{p}encoder\.layers\.({after})\..*", rf"{p}embeddings\.position_ids",
            r"text_model\..*", r"visual_projection\..*", r"text_projection\..*", r"logit_scale")


def clip_prefix(ckpt: Checkpoint, candidates=("vision_model.", "")) -> str:
    """Which prefix this file's CLIP vision keys carry (the layouts differ between transformers versions)."""
    for p in candidates:
        if f"{p}embeddings.patch_embedding.weight" in ckpt.files:
            return p
    raise ValueError(f"{ckpt.path}: no CLIP vision weights found (looked for "
                     f"{[p + 'embeddings.patch_embedding.weight' for p in candidates]}): is this a CLIP checkpoint?")


def projector_keys(kind: str, on_disk: tuple, ours="") -> dict:
    """LLaVA mm_projector. `on_disk` names its Linear layers: ("model.mm_projector.0", "model.mm_projector.2") in
    LLaVA's nn.Sequential(Linear, GELU, Linear), ("multi_modal_projector.linear_1", ...linear_2) in llava-hf,
    ("model.mm_projector",) for LLaVA's single-Linear type 'linear'."""
    names = ("linear_1", "linear_2") if kind == "mlp2x_gelu" else ("linear_1",)
    return {f"{ours}{n}.{w}": f"{d}.{w}" for n, d in zip(names, on_disk) for w in ("weight", "bias")}


LLAVA_PROJECTOR = {"mlp2x_gelu": ("model.mm_projector.0", "model.mm_projector.2"), "linear": ("model.mm_projector",)}


# ----------------------------------------------------------------------------------------------------------------
# Whole VLMs: recognise the layout, build the config and the parts to load; save LLaVA-1.5's layout.

def vlm_parts(path, vision_path, projector_path, build_config, num_voco=None, voco_token_id=None):
    """Recognise a VLM checkpoint's layout; return (config, parts for `load`) from the reader of that layout.
    build_config(text=, vision=, **rest) builds the VoCoLlamaConfig from config dicts. The VoCo settings come from
    config.json's num_voco and voco_token_id in any layout (train.py writes them); num_voco / voco_token_id, when
    given, override them, e.g. for a VoCo-LLaMA model converted to llava-hf's layout by a tool that dropped them (the
    official model: 2 and 32000)."""
    ckpt = Checkpoint(path)
    hf, file = ckpt.config, ckpt.config_file
    kind = require_kind(ckpt, "llava-hf", "llava", "llama")
    voco = dict(num_voco=hf.get("num_voco", 0) if num_voco is None else num_voco,
                voco_token_id=hf.get("voco_token_id", -1) if voco_token_id is None else voco_token_id)

    def make_config(**fields):  # a value the config refuses is reported with the file it came from
        try:
            return build_config(**fields, **voco)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e

    if kind == "llava-hf":
        return llava_hf_parts(ckpt, make_config)
    if kind == "llava":
        return llava_parts(ckpt, vision_path, make_config)
    return llama_parts(ckpt, vision_path, projector_path, make_config)


def llava_hf_parts(ckpt: Checkpoint, make_config):
    """HF LlavaForConditionalGeneration (llava-hf): everything in one checkpoint."""
    hf, file = ckpt.config, ckpt.config_file
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not isinstance(hf.get("vision_feature_layer", -2), int):
        raise ValueError(f"{file}: only LLaVA-1.5's projector (gelu) and a single vision_feature_layer are supported")
    strategy = {"default": "patch", "full": "cls_patch"}.get(hf.get("vision_feature_select_strategy", "default"))
    if strategy is None:
        raise ValueError(f"{file}: vision_feature_select_strategy={hf['vision_feature_select_strategy']!r} is not "
                         f"supported: use 'default' or 'full'")
    config = make_config(text=llama_config(hf["text_config"], file),
                         vision={**clip_config(hf["vision_config"], file), "select_feature": strategy,
                                 "select_layer": hf.get("vision_feature_layer", -2)},
                         projector_type="mlp2x_gelu", image_token_id=hf.get("image_token_index", 32000))
    vp = clip_prefix(ckpt, ("vision_tower.vision_model.", "vision_tower."))  # hub files vs transformers 5
    keys = {**llama_keys(config.text, "llm.", "language_model.model.", "language_model.lm_head.weight"),
            **clip_keys(config.vision, vp, "vision."),
            **projector_keys("mlp2x_gelu", ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
                             "projector.")}
    return config, [(ckpt, keys, LLAMA_UNUSED + clip_unused(config.vision, vp))]


def llava_parts(ckpt: Checkpoint, vision_path, make_config):
    """LLaVA-1.5's own layout (VoCo-LLaMA's training output, what train.py saves): LLaMA keys + model.mm_projector.*,
    the CLIP from vision_path or the config's mm_vision_tower."""
    hf, file = ckpt.config, ckpt.config_file
    vision = Checkpoint(vision_dir(vision_path, hf.get("mm_vision_tower"), ckpt))
    require_kind(vision, "clip")
    kind = hf.get("mm_projector_type", "linear")
    if kind not in LLAVA_PROJECTOR:
        raise ValueError(f"{file}: mm_projector_type={kind!r} is not supported: use 'linear' or 'mlp2x_gelu'")
    config = make_config(text=llama_config(hf, file),
                         vision={**clip_config(vision.config, vision.config_file),
                                 "select_layer": hf.get("mm_vision_select_layer", -2),
                                 "select_feature": hf.get("mm_vision_select_feature", "patch")},
                         projector_type=kind, image_token_id=hf.get("image_token_index", -200),
                         compressor=hf.get("compressor", "none"), compressor_tokens=hf.get("compressor_tokens", 0))
    if hf.get("mm_hidden_size", config.vision.hidden_size) != config.vision.hidden_size:
        raise ValueError(f"{file}: mm_hidden_size={hf['mm_hidden_size']} but the CLIP in {vision.path} has "
                         f"hidden_size={config.vision.hidden_size}: pass the vision tower this model was trained with")
    keys = {**llama_keys(config.text, "llm."), **projector_keys(kind, LLAVA_PROJECTOR[kind], "projector."),
            **compressor_keys(k.removeprefix("model.") for k in ckpt.files)}
    # LLaVA's training under DeepSpeed ZeRO-3 (the official VoCo-LLaMA recipe) also saves the frozen CLIP under
    # model.vision_tower.vision_tower.*: the same weights as mm_vision_tower, which is where they are read from
    frozen_clip_copy = (r"model\.vision_tower\.vision_tower\..*",)
    return config, [(ckpt, keys, LLAMA_UNUSED + frozen_clip_copy), vision_part(vision, config.vision)]


def llama_parts(ckpt: Checkpoint, vision_path, projector_path, make_config):
    """A plain LLaMA/Vicuna + CLIP + LLaVA's stage-1 mm_projector.bin: where VoCo-LLaMA's official recipe starts."""
    if vision_path is None or projector_path is None:
        raise ValueError(f"{ckpt.path} is a plain LLaMA checkpoint (config.json has no mm_projector_type): pass "
                         f"vision_path=<CLIP directory> and projector_path=<LLaVA-1.5 mm_projector.bin>, or a LLaVA "
                         f"checkpoint directory")
    vision, projector = Checkpoint(vision_path), Checkpoint(projector_path, weights_file=True)
    require_kind(vision, "clip")
    kind = "mlp2x_gelu" if "model.mm_projector.0.weight" in projector.files else "linear"
    config = make_config(text=llama_config(ckpt.config, ckpt.config_file),
                         vision=clip_config(vision.config, vision.config_file), projector_type=kind)
    return config, [(ckpt, llama_keys(config.text, "llm."), LLAMA_UNUSED), vision_part(vision, config.vision),
                    (projector, projector_keys(kind, LLAVA_PROJECTOR[kind], "projector."), ())]


def vision_dir(vision_path, mm_vision_tower, ckpt: Checkpoint) -> Path:
    """The CLIP directory: vision_path if given, else the config's mm_vision_tower (absolute, or relative to the
    checkpoint, as save_vlm writes it). A hub name like openai/clip-vit-large-patch14-336 is not downloaded."""
    if vision_path is not None:
        return Path(vision_path)
    for candidate in (Path(mm_vision_tower or ""), ckpt.path / (mm_vision_tower or "")):
        if mm_vision_tower and candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{ckpt.config_file}: mm_vision_tower={mm_vision_tower!r} is not a local directory: "
                            f"download that CLIP checkpoint and pass vision_path=<its directory>")


def vision_part(vision: Checkpoint, c) -> tuple:
    prefix = clip_prefix(vision)
    return vision, clip_keys(c, prefix, "vision."), clip_unused(c, prefix)


def save_vlm(path, c, state: dict):
    """Write the VLM (config `c`, full state dict `state`) in LLaVA-1.5's own layout, what VoCo-LLaMA's official
    training writes: LLaMA keys + model.mm_projector.* in path/, and the CLIP layers that run in
    path/vision_tower/ (CLIPVisionModel layout), which config.json names as mm_vision_tower. Only the layers up to
    the selected one are kept, and the saved select layer counts from the embeddings (num_layers_run, not -1): it
    names that layer both in the cut tower and in the full CLIP it came from, which a user may pass as vision_path.
    nanovoco's own fields (VoCo token, baseline compressor under model.compressor.*) are extra config keys that
    LLaVA's code ignores."""
    path = Path(path)
    save(path / "vision_tower", clip_hf_config(c.vision), state, clip_keys(c.vision, "vision_model.", "vision."))
    hf = {**llama_hf_config(c.text), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
          "mm_vision_tower": "vision_tower", "mm_vision_select_layer": c.vision.num_layers_run,
          "mm_vision_select_feature": c.vision.select_feature, "mm_projector_type": c.projector_type,
          "mm_hidden_size": c.vision.hidden_size, "image_token_index": c.image_token_id,
          "voco_token_id": c.voco_token_id, "num_voco": c.num_voco, "compressor": c.compressor,
          "compressor_tokens": c.compressor_tokens}
    keys = {**llama_keys(c.text, "llm."), **projector_keys(c.projector_type, LLAVA_PROJECTOR[c.projector_type],
                                                           "projector."), **compressor_keys(state)}
    save(path, hf, state, keys)


def compressor_keys(names) -> dict:
    """A baseline compressor keeps nanovoco's own names, under model.compressor.* (no other format has one)."""
    return {k: "model." + k for k in names if k.startswith("compressor.")}
