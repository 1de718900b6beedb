"""The offline end-to-end demo (`make demo`): build a tiny random VoCo-LLaMA-shaped VLM and a tokenizer, save them in
LLaVA-1.5's checkpoint layout, load them back with `VoCoLlama.from_pretrained`, and generate an answer about an
image with the KV cache. The weights are random, so the answer is gibberish; what the demo shows is the pipeline."""
import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nanovoco.config import preset
from nanovoco.generate import stream
from nanovoco.image import preprocess
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import VICUNA_SYSTEM, Tokenizer, render_vicuna, stream_text, train_tiny_tokenizer

CORPUS = [VICUNA_SYSTEM, "USER: What shape is in the image? ASSISTANT: A red circle and a blue square.</s>",
          "Which object is left of the green triangle? How many shapes are there? There are three."]


def demo_image(size=112) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 10, 50, 50), fill="red")
    draw.rectangle((60, 60, 100, 100), fill="blue")
    return img


def main(out="runs/demo", max_new_tokens=24):
    out = Path(out)
    torch.manual_seed(0)
    tokenizer = Tokenizer(train_tiny_tokenizer(CORPUS * 20, out / "tokenizer.model", vocab_size=400))
    VoCoLlama(preset("tiny", tokenizer.vocab_size)).save_pretrained(out / "model")
    print(f"wrote a tiny random checkpoint (LLaVA-1.5 layout) and tokenizer to {out}/")

    t0 = time.perf_counter()
    vlm = VoCoLlama.from_pretrained(out / "model").eval()
    n_params = sum(p.numel() for p in vlm.parameters())
    print(f"loaded it back in {time.perf_counter() - t0:.2f}s: {n_params / 1e6:.1f}M parameters, "
          f"{vlm.config.num_image_tokens} vision tokens per image")

    prompt = render_vicuna([("<image>\nWhat shapes are in the image?", None)])
    ids = torch.tensor([tokenizer.encode_with_images(prompt, vlm.config.image_token_id,
                                                     vlm.config.num_image_tokens)])
    pixels = preprocess(demo_image(), vlm.config.vision.image_size)[None]
    print(f"prompt: {prompt!r} -> {ids.shape[1]} tokens\nanswer: ", end="", flush=True)
    t0, n = time.perf_counter(), 0
    with torch.no_grad():
        tokens = stream(vlm.llm, inputs_embeds=vlm.embed(ids, pixels), max_new_tokens=max_new_tokens,
                        eos_id=tokenizer.eos_id)
        for n, piece in enumerate(stream_text(tokens, tokenizer, tokenizer.eos_id), 1):
            print(piece, end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n{n} tokens in {dt:.2f}s ({n / dt:.0f} tokens/s, prefill included)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    main(args.out, args.max_new_tokens)
