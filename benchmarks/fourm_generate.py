"""4M generation speed: caption tokens/s with our KV cache against re-running the decoder per token (the reference's
way: ml-4m has no KV cache), and image tokens/s for MaskGIT and ROAR at 8 and 16 steps.

One process, one model: a `4m` objective (random weights, seeded; speed does not depend on training) with an
image-token modality (--grid x --grid, 1,000 codes) and a caption modality (--tokens + 1 positions, 8,000 ids).
Captions are decoded greedily from random image tokens for exactly --tokens tokens (no early stop), both ways on
the same encoder output; the check that both ways give the same tokens is reported. Both ways first run the
encoder once over the image tokens (the prefill); the rates are given end to end and for the decoding alone (the
median time of that encoder pass, measured on its own, left out). Images are decoded from random
caption tokens. Rounds interleave the two caption ways; figures are medians over rounds; the ratio is cached /
uncached tokens/s. Each timed run first waits for other processes to go quiet (--max-other-load, --max-wait).

    python benchmarks/fourm_generate.py                      # 32 caption tokens, batch 8, dim 256, 6+6 layers
    python benchmarks/fourm_generate.py --rounds 1 --batch-size 2 --tokens 8 --max-wait 0   # smoke run
    python benchmarks/fourm_generate.py --device cuda --dim 768 --encoder-depth 12 --decoder-depth 12 --heads 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_common import add_quiet_options, finish, machine_info, timed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build(args, device):
    from polymodal.pretrain.objectives import build_objective

    torch.manual_seed(args.seed)
    objective = build_objective({
        "name": "4m", "dim": args.dim, "encoder_depth": args.encoder_depth, "decoder_depth": args.decoder_depth,
        "heads": args.heads, "modalities": {
            "tok_rgb": {"vocab_size": 1000, "grid": [args.grid, args.grid]},
            "tok_caption": {"vocab_size": 8000, "max_length": args.tokens + 1}}})
    return objective.to(device).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="caption tokens to decode (default 32)")
    parser.add_argument("--grid", type=int, default=16, help="image token grid side (default 16: 256 tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--encoder-depth", type=int, default=6)
    parser.add_argument("--decoder-depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--schedules", nargs="+", default=["maskgit:8", "maskgit:16", "roar:8", "roar:16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench-out" / "fourm_generate.json"))
    add_quiet_options(parser)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from polymodal.generate.fourm_generate import FourMGenerator, Sampling, Schedule

    objective = build(args, device)
    if args.precision == "bf16":
        objective = objective.to(torch.bfloat16)
    generator = FourMGenerator(objective, Sampling(temperature=0), seed=args.seed)
    b = args.batch_size
    image = torch.randint(0, 1000, (b, args.grid * args.grid), device=device)
    given_image = {"tok_rgb": (image, torch.full((b,), image.shape[1], device=device))}
    caption = torch.randint(500, 8000, (b, args.tokens), device=device)
    given_caption = {"tok_caption": (caption, torch.full((b,), args.tokens, device=device))}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def decode_caption(cache: bool):
        with torch.no_grad():
            out = generator.generate_sequence(given_image, "tok_caption", b, cache=cache, stop=False)
        sync()
        return out

    same = torch.equal(decode_caption(True)[0], decode_caption(False)[0])  # also the warm-up
    runs = {"cached": [], "uncached": []}
    for r in range(args.rounds):
        for way in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
            _, record = timed(lambda: decode_caption(way == "cached"), args.max_other_load, args.max_wait)
            record["tokens_per_s"] = b * args.tokens / record["seconds"]
            runs[way].append(record)
            print(f"[caption] {way}: {record['tokens_per_s']:.1f} tokens/s", flush=True)
    caption_report = {way: statistics.median(r["tokens_per_s"] for r in records) for way, records in runs.items()}
    caption_report["ratio"] = caption_report["cached"] / caption_report["uncached"]
    caption_report["same_tokens"] = same
    # Both ways first run the encoder once over the conditions (the prefill); the decode rates leave it out.
    def encode():
        with torch.no_grad():
            objective.model.encode(generator.inputs(given_image), packed=False)
        sync()

    encode_s = statistics.median(timed(encode, args.max_other_load, args.max_wait)[1]["seconds"]
                                 for _ in range(args.rounds))
    for way in ("cached", "uncached"):
        seconds = statistics.median(r["seconds"] for r in runs[way]) - encode_s
        caption_report[f"{way}_decode"] = b * args.tokens / seconds
    caption_report["decode_ratio"] = caption_report["cached_decode"] / caption_report["uncached_decode"]
    caption_report["encode_seconds"] = encode_s

    images = {}
    for text in args.schedules:
        generator.schedule = Schedule.parse(text)
        with torch.no_grad():
            generator.generate_image(given_caption, "tok_rgb", b)  # warm-up
            results = []
            for _ in range(args.rounds):
                _, record = timed(lambda: (generator.generate_image(given_caption, "tok_rgb", b), sync()),
                                  args.max_other_load, args.max_wait)
                results.append(b * args.grid ** 2 / record["seconds"])
        images[text] = {"image_tokens_per_s": statistics.median(results), "images_per_s":
                        statistics.median(results) / args.grid ** 2, "runs": results}
        print(f"[image] {text}: {images[text]['image_tokens_per_s']:.0f} tokens/s", flush=True)

    report = {"benchmark": "benchmarks/fourm_generate.py", "settings": vars(args),
              "parameters": sum(p.numel() for p in objective.parameters()),
              "machine": machine_info("torch", device=device), "caption": caption_report,
              "caption_runs": runs, "images": images}
    print(f"\ncaption tokens/s: cached {caption_report['cached']:.1f}, uncached {caption_report['uncached']:.1f}, "
          f"ratio {caption_report['ratio']:.2f}x; decoding alone (the shared encoder pass of "
          f"{encode_s * 1000:.0f} ms left out): {caption_report['cached_decode']:.1f} vs "
          f"{caption_report['uncached_decode']:.1f}, ratio {caption_report['decode_ratio']:.2f}x (same tokens: {same})")
    return finish(args.out, report, t_start)


if __name__ == "__main__":
    raise SystemExit(main())
