"""The offline end-to-end demo (`make demo`): build a tiny random VoCo-LLaMA-shaped VLM with 2 VoCo tokens and a
tokenizer, save them in LLaVA-1.5's checkpoint layout, load them back with `VoCoLlama.from_pretrained`, then run
two-stage inference: stage 1 compresses the image once into the VoCo tokens' KV cache, stage 2 answers two questions
from that cache alone. The weights are random, so the answers are gibberish; what the demo shows is the pipeline and
the cache's size against the whole image's."""
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nanovoco import cli
from nanovoco.config import preset
from nanovoco.data import build_sample
from nanovoco.image import preprocess
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import VICUNA_SYSTEM, VOCO_SYSTEM, Tokenizer, stream_text, train_tiny_tokenizer
from nanovoco.voco import Layout, compress_prefix
from nanovoco.voco_cache import compress, stream_from_cache

CORPUS = [VICUNA_SYSTEM, "USER: What shape is in the image? ASSISTANT: A red circle and a blue square.</s>",
          "Which object is left of the green triangle? How many shapes are there? There are three."]
QUESTIONS = ("What shapes are in the image?", "How many shapes are there?")


def demo_image(size=112) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 10, 50, 50), fill="red")
    draw.rectangle((60, 60, 100, 100), fill="blue")
    return img


def main(out="runs/demo", max_new_tokens=24, num_voco=2):
    out = Path(out)
    torch.manual_seed(0)
    tokenizer = Tokenizer(train_tiny_tokenizer(CORPUS * 20, out / "tokenizer.model", vocab_size=400))
    config = preset("tiny", tokenizer.vocab_size)
    config.voco_token_id, config.num_voco = tokenizer.special_ids["<voco>"], num_voco
    VoCoLlama(config).save_pretrained(out / "model")
    print(f"wrote a tiny random checkpoint (LLaVA-1.5 layout) and tokenizer to {out}/")

    t0 = time.perf_counter()
    vlm = VoCoLlama.from_pretrained(out / "model").eval()
    c = vlm.config
    n_params = sum(p.numel() for p in vlm.parameters())
    print(f"loaded it back in {time.perf_counter() - t0:.2f}s: {n_params / 1e6:.1f}M parameters, "
          f"{c.num_image_tokens} vision tokens per image, {c.num_voco} VoCo tokens")

    # stage 1: [BOS] [image x N] [\n] [<voco> x K] once; only the VoCo tokens' keys and values are kept
    prefix = torch.tensor(compress_prefix(tokenizer, Layout.of(c)))
    pixels = preprocess(demo_image(), c.vision.image_size)[None]
    t0 = time.perf_counter()
    cache = compress(vlm, pixels, prefix)
    cached = sum(k.nbytes + v.nbytes for k, v in cache.kv)
    print(f"stage 1: {prefix.numel()} tokens -> a VoCo cache of {cache.positions.numel()} tokens, "
          f"{cached / 1e3:.1f} kB (the whole prefix's cache: {cached * prefix.numel() / c.num_voco / 1e3:.1f} kB), "
          f"{time.perf_counter() - t0:.2f}s")

    # stage 2: every question from the cache alone, never seeing the image again
    for question in QUESTIONS:
        s = build_sample(tokenizer, [(question, None)], Layout.of(c), system=VOCO_SYSTEM)
        print(f"Q: {question}\nA: ", end="", flush=True)
        t0, n = time.perf_counter(), 0
        tokens = stream_from_cache(vlm, cache, torch.tensor([s.text_ids()]), max_new_tokens=max_new_tokens,
                                   eos_id=tokenizer.eos_id)
        for n, piece in enumerate(stream_text(tokens, tokenizer, tokenizer.eos_id), 1):
            print(piece, end="", flush=True)
        dt = time.perf_counter() - t0
        print(f"\n({n} tokens in {dt:.2f}s from the cache, {n / dt:.0f} tokens/s)")


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--num_voco", type=int, default=2, help="K, VoCo tokens per image (must be >= 1)")
    args = parser.parse_args()
    if args.num_voco < 1 or args.max_new_tokens < 1:
        parser.error("--num_voco and --max_new_tokens must be >= 1")
    main(args.out, args.max_new_tokens, args.num_voco)
