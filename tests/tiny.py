"""Tiny random-init reference checkpoints, written by transformers' own save_pretrained (offline, no hub).

Each builder returns the transformers model (the reference the tests compare against) after saving it to `path`.
The LLaVA-1.5 original layout and the stage-1 projector file are not written by transformers 5; they are produced
here by renaming a saved llava-hf checkpoint's tensors, independently of nanovoco's own writer.
"""
import json
import random
import unicodedata
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

TEXT_CONFIG = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
VISION_CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14)  # 4 x 4 = 16 patches
IMAGE_TOKEN = 150  # llava-hf's image_token_index inside the tiny vocabulary
NUM_PATCHES = (VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"]) ** 2


def hf_llama(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TEXT_CONFIG, **overrides})).eval()
    model.save_pretrained(path)
    return model


def hf_clip(path, full=False, seed=0, **overrides):
    """CLIPVisionModel, or with full=True a whole CLIPModel (vision + text) like openai/clip-vit-large-patch14-336."""
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(**{**VISION_CONFIG, **overrides})
    if full:
        text = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=16)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                               vision_config=vision.to_dict(), projection_dim=16))
    else:
        model = transformers.CLIPVisionModel(vision)
    model.eval().save_pretrained(path)
    return model


def hf_llava(path, seed=0, text=None, vision=None, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**{**TEXT_CONFIG, **(text or {})}),
                                      vision_config=transformers.CLIPVisionConfig(**{**VISION_CONFIG,
                                                                                     **(vision or {})}),
                                      image_token_index=IMAGE_TOKEN, **overrides)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return model


def llava_original(llava_hf_dir, path):
    """Rewrite a saved llava-hf checkpoint in LLaVA-1.5's own layout (what VoCo-LLaMA's training writes):
    path/ holds LLaMA keys + model.mm_projector.{0,2}.*, path/clip/ the vision tower (vision_model.* keys)."""
    src, path = Path(llava_hf_dir), Path(path)
    hf = json.loads((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    llm, clip = {}, {}
    for key, t in state.items():
        if key.startswith("language_model.model."):
            llm["model." + key.removeprefix("language_model.model.")] = t
        elif key == "language_model.lm_head.weight":
            llm["lm_head.weight"] = t
        elif key.startswith("multi_modal_projector.linear_"):
            llm[key.replace("multi_modal_projector.linear_1", "model.mm_projector.0")
                   .replace("multi_modal_projector.linear_2", "model.mm_projector.2")] = t
        else:
            clip["vision_model." + key.removeprefix("vision_tower.")] = t
    (path / "clip").mkdir(parents=True)
    save_file(clip, path / "clip" / "model.safetensors")
    clip_config = {**hf["vision_config"], "architectures": ["CLIPVisionModel"]}
    (path / "clip" / "config.json").write_text(json.dumps(clip_config))
    save_file(llm, path / "model.safetensors")
    config = {**hf["text_config"], "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": str(path / "clip"),
              "mm_vision_select_layer": hf["vision_feature_layer"], "mm_vision_select_feature": "patch",
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": hf["vision_config"]["hidden_size"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def stage1(llava_original_dir, path):
    """Split a LLaVA-1.5 original checkpoint into what the official VoCo-LLaMA recipe starts from: a plain
    LLaMA directory and LLaVA's stage-1 `mm_projector.bin` (a torch pickle of the projector's tensors)."""
    src, path = Path(llava_original_dir), Path(path)
    state = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    path.mkdir(parents=True)
    save_file({k: t for k, t in state.items() if "mm_projector" not in k}, path / "model.safetensors")
    config = {k: v for k, v in config.items() if not k.startswith("mm_")} | {"architectures": ["LlamaForCausalLM"]}
    (path / "config.json").write_text(json.dumps(config))
    torch.save({k: t for k, t in state.items() if "mm_projector" in k}, path / "mm_projector.bin")
    return path / "mm_projector.bin"


def image_ids(batch=2, text_len=5, seed=0, image_token=IMAGE_TOKEN):
    """(B, L) prompt ids: BOS, NUM_PATCHES image placeholders, text. And (B, 3, H, W) pixel values."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN, (batch, text_len), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, NUM_PATCHES), image_token), text], 1)
    pixels = torch.randn(batch, 3, VISION_CONFIG["image_size"], VISION_CONFIG["image_size"], generator=g)
    return ids, pixels


def byte_chars():
    """GPT-2's byte -> printable character map (bytes_to_unicode), written out as the reference does."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = chr(256 + n), n + 1
    return [chars[b] for b in range(256)]


# A tiny byte-level BPE vocabulary in SmolLM2's style: ChatML's special tokens (GGUF token type 3, control), the 256
# byte characters, a few merges
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n"]
BPE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars() + [m.replace(" ", "") for m in BPE_MERGES]
BPE_TYPES = [3] * 3 + [1] * (len(BPE_TOKENS) - 3)


def bpe_tokenizer(path) -> Path:
    """Write that vocabulary as tokenizer.json + tokenizer_config.json into `path`, through from_gguf's own
    translation of GGUF metadata (SmolLM2's: <|im_start|> as BOS, not added; <|im_end|> as EOS)."""
    from nanovoco.from_gguf import hf_tokenizer

    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": BPE_TOKENS,
              "tokenizer.ggml.token_type": BPE_TYPES, "tokenizer.ggml.merges": BPE_MERGES,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    tokenizer, config = hf_tokenizer(fields, "tiny")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def awkward_strings(n, seed=0) -> list[str]:
    """Strings a user may type, generated for the tokenizer tests: n with a character of every Unicode general
    category (bar the surrogates, which are not text and are refused), n of words, digits and punctuation between
    runs of whitespace and newlines, and one long input of ~10,000 characters."""
    rng = random.Random(seed)
    by_category = {}
    for code in range(0x110000):
        by_category.setdefault(unicodedata.category(chr(code)), []).append(chr(code))
    del by_category["Cs"]
    blanks = [" ", "  ", "\n", "\n\n", " \n ", "\t", "\r\n", "\u3000", "\u2028", " " * 17]
    words = ["Hello", " world", "123", " 42", "3.14", "café", "東京", "👩‍💻", "don't", "Привет", "x²", "{}", "...", "—",
             "https://x.org/a?b=1", "if (a < b) { return; }", "e\u0301", "\u200b", "\u00a0"]
    out = ["".join(rng.choice(by_category[c]) + rng.choice(["", *blanks]) for c in sorted(by_category))
           for _ in range(n)]
    out += ["".join(rng.choice(blanks) + rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    return out + ["".join(rng.choice(blanks + words) for _ in range(2000))]
