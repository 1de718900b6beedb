"""Where a model to train starts (train.py --init): `build_model` makes it from a checkpoint, from a plain LLM and a
vision tower joined by a new projector, or from a preset with fresh weights (`init_weights`: the tiny repro models;
a real run starts from pretrained weights), then sets it up for the training mode: the <voco> token for VoCo-LLaMA,
a new compressor for the baselines. `cfg` is train.py's TrainConfig (mode, num_voco, init, vision_path,
projector_path, voco_init, freeze_vision, seed)."""
import dataclasses

import torch
import torch.nn as nn

from nanovoco import checkpoint, formats
from nanovoco.config import CLIPVisionConfig, VoCoLlamaConfig, preset
from nanovoco.model import CLIPVisionTower, Llama, Projector, RMSNorm, VoCoLlama


def model_config(cfg, source) -> VoCoLlamaConfig:
    """The shape of the model to train, read without its weights: what the data is drawn and laid out for (image
    size, vision tokens), known before the model is built. From the checkpoint, else the preset with the
    --vision_path CLIP's vision part."""
    if new_projector(cfg, source):
        llm, clip = checkpoint.Checkpoint(source), checkpoint.Checkpoint(cfg.vision_path)
        formats.require_kind(clip, "clip")
        config = VoCoLlamaConfig.from_dicts(formats.llama_config(llm.config, llm.config_file),
                                            formats.clip_config(clip.config, clip.config_file))
    elif source is not None:
        config = formats.vlm_parts(source, cfg.vision_path or None, cfg.projector_path or None,
                                   VoCoLlamaConfig.from_dicts)[0]
    else:
        config = preset(cfg.init)
        if cfg.vision_path:
            clip = checkpoint.Checkpoint(cfg.vision_path)
            formats.require_kind(clip, "clip")
            config.vision = CLIPVisionConfig(**formats.clip_config(clip.config, clip.config_file))
    return with_compressor(config, cfg)


def new_projector(cfg, source) -> bool:
    """Whether the VLM starts from a plain LLM checkpoint and a vision tower with a new projector (no
    --projector_path): a pretrained LLM without a LLaVA stage 1, like SmolLM2 with the repro's tiny tower."""
    if source is None or cfg.projector_path or formats.require_kind(
            checkpoint.Checkpoint(source), "llama", "llava", "llava-hf") != "llama":
        return False
    if not cfg.vision_path:
        raise ValueError(f"{source} is a plain LLM checkpoint: pass --vision_path=<CLIP directory> (and "
                         f"--projector_path=<LLaVA-1.5 mm_projector.bin>, or none for a new projector)")
    return True


def with_compressor(config: VoCoLlamaConfig, cfg) -> VoCoLlamaConfig:
    """The baselines' config: an external compressor to --num_voco tokens, unless the checkpoint has one already."""
    if cfg.mode in ("avgpool", "qformer") and config.compressor == "none":
        return dataclasses.replace(config, compressor=cfg.mode, compressor_tokens=cfg.num_voco)
    return config


def build_model(cfg, tokenizer, source) -> VoCoLlama:
    """The model to train: from a checkpoint (or a preset, from scratch), set up for the mode. VoCo modes add the
    <voco> token to the vocabulary; the baselines get a new compressor; nothing else changes."""
    if source is None:  # an LLM from scratch, with a vision tower from scratch or pretrained (--vision_path)
        torch.manual_seed(cfg.seed)
        config = preset(cfg.init, vocab_size=tokenizer.vocab_size)
        vision = CLIPVisionTower.from_pretrained(cfg.vision_path) if cfg.vision_path else None
        if vision is not None:
            config.vision = vision.config
        vlm = VoCoLlama(config)
        # The projector keeps PyTorch's default init (std ~ 1/sqrt(3 fan_in)): at 0.02 its two layers would shrink
        # the image features some 50x, and the LLM would never learn that the image is there.
        init_weights(vlm.llm)
        init_weights(vlm.vision)
        if vision is not None:
            vlm.vision = vision
    elif new_projector(cfg, source):  # a pretrained LLM and tower, joined by a projector trained from scratch
        llm, vision = Llama.from_pretrained(source), CLIPVisionTower.from_pretrained(cfg.vision_path)
        with torch.device("meta"):  # the parts are loaded: build the shell without allocating them again
            vlm = VoCoLlama(VoCoLlamaConfig(text=llm.config, vision=vision.config))  # their configs, the same objects
        torch.manual_seed(cfg.seed)
        vlm.llm, vlm.vision = llm, vision
        vlm.projector = Projector(vlm.config.projector_type, vision.config.hidden_size, llm.config.hidden_size)
    else:
        vlm = VoCoLlama.from_pretrained(source, vision_path=cfg.vision_path or None,
                                        projector_path=cfg.projector_path or None)
    c = vlm.config
    if cfg.mode in ("voco", "lower_bound") and c.num_voco == 0:
        if tokenizer.vocab_size > c.text.vocab_size:
            vlm.llm.resize_vocab(tokenizer.vocab_size)  # <voco> becomes id 32000 on Vicuna's vocabulary
        c.voco_token_id, c.num_voco = tokenizer.special_ids["<voco>"], cfg.num_voco
        if cfg.voco_init == "newline":
            # The "\n" after the image is, in the trained VLM, the token that has attended to the whole image at
            # every layer. A VoCo token that starts as its copy starts out gathering the image the same way, rather
            # than from a random embedding: on the repro's tiny model the VoCo stage then escapes its plateau of
            # answering from priors in ~60 steps instead of ~170 (docs/results.md).
            newline = tokenizer.encode("\n", bos=False)[-1]
            with torch.no_grad():
                vlm.llm.embed_tokens.weight[c.voco_token_id] = vlm.llm.embed_tokens.weight[newline]
    if cfg.mode in ("voco", "lower_bound"):
        c.num_voco = cfg.num_voco  # the K it trains on (of --voco_ks, the default one): inference's default K
    baseline = with_compressor(c, cfg)
    if baseline is not c:
        torch.manual_seed(cfg.seed)
        new = VoCoLlama(baseline)
        missing, unexpected = new.load_state_dict(vlm.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("compressor.") for k in missing), (missing, unexpected)
        vlm = new
    vlm.vision.requires_grad_(not cfg.freeze_vision)  # the paper trains the LLM and the projector, not CLIP
    return vlm


def init_weights(module: nn.Module):
    """N(0, 0.02) weights and zero biases for every Linear, Embedding and Conv2d, as GPT and ViT do, norms to the
    identity (weight 1, bias 0); a CLIP tower also gets a N(0, 0.02) class embedding and fixed 2D sine-cosine
    positions (see sincos_2d). Every parameter is written, so it also initialises a model materialised from the meta
    device with to_empty (nanovoco.repro.bench's 7B model), whose memory holds garbage."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if hasattr(m, "class_embedding"):  # CLIP's learned embeddings are bare parameters
            nn.init.normal_(m.class_embedding, std=0.02)
            with torch.no_grad():
                m.position_embedding.copy_(sincos_2d(m.config))


def sincos_2d(c) -> torch.Tensor:
    """(1 + patches, dim) fixed 2D sine-cosine position embeddings (MAE's), CLS row zero: the init of a vision tower
    trained from scratch. With N(0, 0.02) the position of a patch is lost next to its content, and a LLaMA decoder
    cannot recover it (RoPE puts positions into attention scores, never into values), so "is the red object on the
    left?" would be unanswerable."""
    side, quarter = c.image_size // c.patch_size, c.hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = [f(coord.flatten()[:, None] * omega) for coord in (xs, ys) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)  # (side * side, 4 * quarter)
    out = torch.zeros(1 + side * side, c.hidden_size)
    out[1:, :grid.shape[1]] = grid
    return out
