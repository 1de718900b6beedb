"""Answer questions about an image or a video with a VoCo-LLaMA checkpoint, by two-stage inference (paper Sec. 3.3):
stage 1 compresses the image once into the VoCo tokens' KV cache, stage 2 answers every question from that cache.

    python infer.py --model runs/voco/checkpoint/model --image scene.png --question "What shape is the red object?" \
        --question "How many squares are there?"
    python infer.py --model DIR --image scene.png --save_cache scene.voco      # stage 1 only: keep the cache
    python infer.py --model DIR --cache scene.voco --question "..."            # stage 2 only, later
    python infer.py --model DIR --video clip.gif --fps 2 --max_frames 16 --question "..."   # or a folder of frames
    python infer.py --model DIR --mode full --image scene.png --question "..."  # no compression: the whole image

--model is a checkpoint directory (train.py's OUT/checkpoint/model, a LLaVA-1.5 directory + --vision, or a
Vicuna directory + --vision + --projector) with its tokenizer (tokenizer.model or tokenizer.json); the system prompt
it was trained with is read from its prompt.json (train.py writes it), else its template's default (VoCo-LLaMA's for
a Vicuna model, the default system turn of its chat template for a ChatML one such as SmolLM2). Answers are printed
as they are generated.
A video is compressed frame by frame into one cache (voco_cache.compress_video): its frames cost K positions each.
"""
import argparse
import sys
import time

import torch

from nanovoco import cli, files, voco_cache
from nanovoco.cache_file import load_cache, save_cache
from nanovoco.data import build_sample
from nanovoco.generate import check_sampling, stream
from nanovoco.image import load_image, load_video, preprocess
from nanovoco.model import VoCoLlama, check_length
from nanovoco.tokenizer import load_tokenizer, stream_text, trained_system_prompt
from nanovoco.voco import Layout, compress_prefix


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--vision", help="CLIP directory, for a LLaVA or LLaMA checkpoint that lacks its vision tower")
    p.add_argument("--projector", help="LLaVA's mm_projector.bin, for a plain LLaMA/Vicuna checkpoint")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the one in --model)")
    p.add_argument("--system", help="system prompt (default: the model's prompt.json, else its template's "
                                     "default; '' for none)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file")
    source.add_argument("--video", nargs="+", help="an animated GIF/WebP/PNG, a folder of frames, or frame files")
    source.add_argument("--cache", help="a VoCo cache written by --save_cache (stage 2 only)")
    p.add_argument("--fps", type=float, help="frames per second to keep from an animated --video")
    p.add_argument("--max_frames", type=int, help="keep at most this many frames, evenly spaced")
    p.add_argument("--question", action="append", default=[], help="a question; repeat for more")
    p.add_argument("--save_cache", help="write the image's (or video's) VoCo cache to this file")
    p.add_argument("--mode", choices=("voco", "full"), help="voco: two-stage from the VoCo cache (default for a "
                   "model with VoCo tokens); full: the image itself in the prompt, no compression")
    p.add_argument("--num_voco", type=int, help="K, VoCo tokens per image or frame to compress to (default: the "
                   "checkpoint's config.json): any K of a model trained with several (train.py --voco_ks), or a K "
                   "that a model was not trained for (the paper's Table 4); with --cache, the K the cache must hold")
    p.add_argument("--voco_token_id", type=int, help="the id of <voco> (default: the checkpoint's config.json)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="decode with a static KV cache and a compiled step "
                   "(generate.static_decoder: the same tokens; the first question compiles it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on CUDA, else fp32")
    return p.parse_args(argv)


def run(args):
    """Load the model, lay out the prompts (checked before any work), stage 1 (compress, or a cache file), stage 2."""
    vlm, tokenizer, mode = load(args)
    c = vlm.config
    images = [load_image(args.image)] if args.image else load_video(args.video, args.fps, args.max_frames) \
        if args.video else []
    pixels = torch.stack([preprocess(img, c.vision.image_size) for img in images]).to(args.device) if images else None
    num_frames = len(images) or 1  # a cache from a file: the text part does not depend on it
    system = args.system if args.system is not None else trained_system_prompt(args.model)
    layout = Layout.of(c, c.num_voco if mode == "voco" else 0)
    prompts = [build_sample(tokenizer, [(q, None)], layout, num_frames=num_frames, max_len=sys.maxsize,
                            system=system)  # the training layout; prompts are never cut
               for q in args.question]
    for s in prompts:  # before any work: a prompt too long for the context is an error
        check_length(s.positions[-1], args.max_new_tokens, c.text.max_position_embeddings)
    cache = compress(args, vlm, tokenizer, pixels, num_frames) if mode == "voco" else None
    answer(args, vlm, tokenizer, prompts, cache, pixels)


def load(args):
    """The model (in --dtype on --device), its tokenizer, and the mode: "voco" (two stages) or "full"."""
    if args.save_cache:  # checked, and its folder made, before the model is loaded
        args.save_cache = files.output_file(args.save_cache, "--save_cache")
    if args.num_voco is not None and args.num_voco < 1:
        raise ValueError(f"--num_voco {args.num_voco}: give the number of VoCo tokens per image, at least 1")
    # the sampling options, before the model is loaded (eos_id, the tokenizer's, is checked with the model)
    check_sampling(sys.maxsize, args.max_new_tokens, args.temperature, args.top_p)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    vlm = VoCoLlama.from_pretrained(args.model, vision_path=args.vision, projector_path=args.projector, dtype=dtype,
                                    device=device, num_voco=args.num_voco, voco_token_id=args.voco_token_id).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    mode = args.mode or ("voco" if vlm.config.num_voco else "full")
    if mode == "voco" and not vlm.config.num_voco:
        raise ValueError(f"{args.model} has no VoCo tokens (num_voco=0 in its config.json): use --mode full")
    if mode == "full" and (args.cache or args.save_cache):
        raise ValueError("--cache and --save_cache hold VoCo caches: they need --mode voco")
    if not args.question and not args.save_cache:
        raise ValueError("nothing to do: pass --question (one or more) and/or --save_cache")
    return vlm, tokenizer, mode


def compress(args, vlm, tokenizer, pixels, num_frames):
    """Stage 1: the image (or each frame) with its VoCo tokens, of which only the VoCo KV cache is kept; or the
    cache from --cache. Saved to --save_cache when asked."""
    c, t0 = vlm.config, time.perf_counter()
    if args.cache:
        cache = load_cache(args.cache, vlm, num_voco=args.num_voco)
    else:
        prefix = torch.tensor(compress_prefix(tokenizer, Layout.of(c)), device=args.device)
        stage1 = voco_cache.compress if args.image else voco_cache.compress_video
        cache = stage1(vlm, pixels, prefix)
    n_bytes = sum(k.nbytes + v.nbytes for k, v in cache.kv)
    print(f"stage 1 ({'loaded' if args.cache else f'{num_frames} frame(s) compressed'}): "
          f"{cache.positions.numel()} VoCo tokens, {n_bytes / 1e6:.3f} MB of KV cache, "
          f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)
    if args.save_cache:
        save_cache(args.save_cache, cache, vlm)
        print(f"wrote {args.save_cache}", file=sys.stderr)
    return cache


def answer(args, vlm, tokenizer, prompts, cache, pixels):
    """Stage 2, question by question, printed as it is generated: from the VoCo cache (only the text after the VoCo
    tokens is run), or without one (--mode full) from the whole prompt, vision tokens included."""
    generator = torch.Generator(args.device).manual_seed(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_id=tokenizer.eos_id, generator=generator, fast=args.fast)
    for question, s in zip(args.question, prompts):
        print(f"Q: {question}\nA:", end=" ", flush=True)
        t0 = time.perf_counter()
        if cache is not None:
            text = torch.tensor([s.text_ids()], device=args.device)
            tokens = voco_cache.stream_from_cache(vlm, cache, text, **options)
        else:  # no VoCo tokens: plain causal attention over the whole prompt
            ids, segments, groups, positions = (torch.tensor([x], device=args.device) for x in (
                s.input_ids, s.segments, s.groups, s.positions))
            with torch.no_grad():
                embeds = vlm.embed(ids, pixels)
            tokens = stream(vlm.llm, inputs_embeds=embeds, segments=segments, groups=groups,
                            position_ids=positions, **options)
        n = 0
        for n, piece in enumerate(stream_text(tokens, tokenizer, tokenizer.eos_id), 1):
            print(piece, end="", flush=True)
        print()
        print(f"({n} tokens, {time.perf_counter() - t0:.2f}s)", file=sys.stderr)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what and how to fix it, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
