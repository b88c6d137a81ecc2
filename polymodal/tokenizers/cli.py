"""`polymodal tokenizer eval` (a trained image tokenizer's figures on held-out data, as JSON) and
`polymodal tokenizer train-text` (a WordPiece vocabulary with 4M's extra tokens)."""

from __future__ import annotations

import argparse


def cmd_eval(args: argparse.Namespace) -> int:
    from polymodal.tokenizers.evaluate import evaluate_tokenizer, write_result

    result = evaluate_tokenizer(args.run, args.dataset, batch_size=args.batch_size, limit=args.limit,
                                workers=args.workers, show_progress=not args.quiet, join=args.join)
    path = write_result(result, args.output)
    m = result["metrics"]
    print(f"{args.run} on {args.dataset} ({m['images']} images): " + ", ".join(
        f"{k} {m[k]:.4g}" for k in ("recon_loss", "psnr", "ssim", "codebook_usage", "perplexity") if k in m))
    print(f"wrote {path}")
    return 0


def read_texts(source: str, field: str | None) -> list[str]:
    """Captions from a .txt file (one per line), a .jsonl file (`field` of each row), or shards (their captions)."""
    import json
    from pathlib import Path

    from polymodal.data.errors import ConfigError

    path = Path(source)
    if path.suffix == ".txt" and path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl" and path.is_file():
        if not field:
            raise ConfigError(f"{source}: a .jsonl source needs --field (the caption's key)")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if any(field not in row for row in rows):
            raise ConfigError(f"{source}: some rows have no {field!r} field")
        return [str(row[field]) for row in rows]
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader

    loader = ShardLoader(DataConfig(shards=[source], modalities=["caption"], image_size=None, augment=False,
                                    batch_size=256, num_workers=1, shuffle_buffer=0))
    return [caption for batch in loader for caption in batch["caption"]]


def cmd_train_text(args: argparse.Namespace) -> int:
    import json
    import random
    from pathlib import Path

    from polymodal.tokenizers.text import train_wordpiece

    texts = [t for source in args.input for t in read_texts(source, args.field)]
    random.Random(0).shuffle(texts)
    held = texts[: int(len(texts) * args.holdout)]
    train = texts[len(held):]
    tok = train_wordpiece(train, vocab_size=args.vocab_size, sentinels=args.sentinels,
                          modalities=args.modalities.split(","), bins=args.bins, keys=args.keys)
    out = Path(args.output)
    tok.save(out / "tokenizer.json")
    stats = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "train_texts": len(train),
             "held_out_texts": len(held), "held_out_unknown_rate": tok.unknown_rate(held) if held else None,
             "mean_pieces_per_text": sum(len(tok.encode(t)) for t in held) / max(len(held), 1),
             "settings": tok.tokenizer_config()}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(f"WordPiece vocabulary of {tok.vocab_size} from {len(train)} texts -> {out / 'tokenizer.json'}; "
          f"held-out [UNK] rate {stats['held_out_unknown_rate']}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    tok = commands.add_parser("tokenizer", help="tokenizers: train a WordPiece vocabulary; evaluate image tokenizers")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    ev = sub.add_parser("eval", help="reconstruction PSNR/SSIM, codebook usage and perplexity on held-out shards",
                        description="Evaluate a trained image tokenizer (a `polymodal pretrain` run of objective "
                                    "fsq or vqvae) on held-out shards: reconstruction loss, PSNR and SSIM "
                                    "(torchmetrics), the share of the codebook the set uses, and the perplexity of "
                                    "its codes. Writes OUTPUT/<run>_tokenizer_reconstruction.json, and .png: held-out "
                                    "inputs over their reconstructions from tokens.",
                        epilog="example: polymodal tokenizer eval runs/tokenizer-fsq-cifar --dataset out/cifar10/test")
    ev.add_argument("run", help="a run folder (its model.safetensors) or an exported .safetensors file")
    ev.add_argument("--dataset", required=True, help="held-out shards: a folder, pattern or brace list")
    ev.add_argument("--join", action="append", metavar="FOLDER",
                    help="a shard set joined to the dataset by key (e.g. derived edges for an edges tokenizer); "
                         "repeatable")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--output", default="eval-out", help="results folder (default: eval-out)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    text = sub.add_parser("train-text", help="train a WordPiece vocabulary with 4M's extra tokens on captions",
                          description="Train a lower-cased WordPiece vocabulary (Hugging Face tokenizers) on captions "
                                      "and add 4M's extra tokens: [PAD] [UNK] [EOS], sentinels [S_0].., a start "
                                      "token per sequence modality, and bin tokens v0=.. (values) and v1=.. (keys, "
                                      "counts). Writes OUTPUT/tokenizer.json and OUTPUT/stats.json (the held-out "
                                      "unknown-token rate, the fingerprint).",
                          epilog="example: polymodal tokenizer train-text data-out/mixed/emoji ../shared/data/"
                                 "imagenet-samples/captions_wordnet.jsonl --field gloss -o out/wordpiece")
    text.add_argument("input", nargs="+", help="shards with captions, .txt (a caption per line) or .jsonl files")
    text.add_argument("-o", "--output", required=True, help="folder for tokenizer.json and stats.json")
    text.add_argument("--field", default=None, help="the caption's key in .jsonl rows")
    text.add_argument("--vocab-size", type=int, default=8000, help="including the extra tokens (default 8000)")
    text.add_argument("--sentinels", type=int, default=100)
    text.add_argument("--modalities", default="caption,palette,metadata,label",
                      help="sequence modalities that get a start token (comma-separated)")
    text.add_argument("--bins", type=int, default=256, help="value bin tokens v0=0.. (default 256)")
    text.add_argument("--keys", type=int, default=64, help="key/count tokens v1=0.. (default 64)")
    text.add_argument("--holdout", type=float, default=0.05, help="share of texts held out for the [UNK] rate")
    text.set_defaults(func=cmd_train_text)
