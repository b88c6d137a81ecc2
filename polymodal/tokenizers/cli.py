"""`polymodal tokenizer eval`: a trained image tokenizer's figures on held-out data, as JSON."""

from __future__ import annotations

import argparse


def cmd_eval(args: argparse.Namespace) -> int:
    from polymodal.tokenizers.evaluate import evaluate_tokenizer, write_result

    result = evaluate_tokenizer(args.run, args.dataset, batch_size=args.batch_size, limit=args.limit,
                                workers=args.workers, show_progress=not args.quiet)
    path = write_result(result, args.output)
    m = result["metrics"]
    print(f"{args.run} on {args.dataset} ({m['images']} images): " + ", ".join(
        f"{k} {m[k]:.4g}" for k in ("recon_loss", "psnr", "ssim", "codebook_usage", "perplexity") if k in m))
    print(f"wrote {path}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    tok = commands.add_parser("tokenizer", help="image tokenizers: held-out evaluation")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    ev = sub.add_parser("eval", help="reconstruction PSNR/SSIM, codebook usage and perplexity on held-out shards",
                        description="Evaluate a trained image tokenizer (a `polymodal pretrain` run of objective "
                                    "fsq or vqvae) on held-out shards: reconstruction loss, PSNR and SSIM "
                                    "(torchmetrics), the share of the codebook the set uses, and the perplexity of "
                                    "its codes. Writes OUTPUT/<run>_tokenizer_reconstruction.json.",
                        epilog="example: polymodal tokenizer eval runs/tokenizer-fsq-cifar --dataset out/cifar10/test")
    ev.add_argument("run", help="a run folder (its model.safetensors) or an exported .safetensors file")
    ev.add_argument("--dataset", required=True, help="held-out shards: a folder, pattern or brace list")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--output", default="eval-out", help="results folder (default: eval-out)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
