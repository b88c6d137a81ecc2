"""`polymodal embed`, `polymodal index` and `polymodal search`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from polymodal.data.errors import ConfigError

EMBED_DESCRIPTION = """\
Encode every sample of INPUT with MODEL and write clip-retrieval's layout to OUTPUT:
img_emb/img_emb_{N}.npy, text_emb/text_emb_{N}.npy and metadata/metadata_{N}.parquet (row i of each .npy is
row i of the parquet: the sample's key and fields), one set per part; skipped/skipped_{N}.jsonl lists the
samples of part N that could not be read, with their error.

Parts are the input's shards (a caption file: --rows-per-part rows each). Every rank (torchrun, srun,
accelerate) and every loader worker encodes whole parts of its own. Run the same command again after a crash:
finished parts are kept, the unfinished ones are redone.

inputs: a shard folder, pattern or list (A::B); an image folder with class subfolders, a .tar.gz of one,
        IDX or .npz arrays (written into shards in the cache once); a caption file (.jsonl, .csv, .parquet).
models: as `polymodal eval --model`: RUN_DIR, FILE.safetensors, open_clip:NAME[:WEIGHTS], timm:NAME[:WEIGHTS],
        efficientnet-lite0."""

EMBED_EPILOG = """\
examples:
  polymodal embed --model runs/clip --input data/pairs --output emb/pairs
  polymodal embed --model open_clip:ViT-B-32:vit_b32.pt --input captions.parquet --output emb/captions
  torchrun --nproc-per-node 8 -m polymodal embed --model runs/clip --input 'data/{000..999}.tar' --output emb
  polymodal index emb/pairs && polymodal search "a red car" --embeddings emb/pairs

Exit codes: 0 done, 2 bad input (one line naming it)."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`polymodal embed`, `polymodal index` and `polymodal search`."""
    embed = commands.add_parser("embed", help="embeddings of shards, image folders or caption files "
                                "(clip-retrieval layout)", description=EMBED_DESCRIPTION,
                                epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_embed_arguments(embed)
    index = commands.add_parser("index", help="build a faiss index over `polymodal embed` output",
                                description="Build OUT/image.index and/or OUT/text.index (faiss, inner product: "
                                            "cosine for normalised embeddings) from the finished parts of OUT.",
                                epilog="example: polymodal index emb/pairs --factory IVF256,Flat")
    add_index_arguments(index)
    search = commands.add_parser("search", help="nearest neighbours of a text or image query in an index",
                                 description="Encode QUERY (text, or an image file) with the model that made the "
                                             "embeddings and print the top-k rows: score, key and caption.",
                                 epilog='example: polymodal search "a red car" --embeddings emb/pairs -k 5')
    add_search_arguments(search)


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model spec (see above)")
    parser.add_argument("--input", required=True, help="shards, image folder or caption file (see above)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--what", choices=["auto", "image", "text", "both"], default="auto",
                        help="embeddings to write; auto: images, plus captions for an image-text model when the "
                             "shards have them; text only for a caption file (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="of the stored embeddings (default: %(default)s)")
    parser.add_argument("--no-normalize", action="store_true", help="store raw embeddings, not L2-normalised ones")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes per rank (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast precision of the encoders (default: %(default)s)")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's training resolution")
    parser.add_argument("--rows-per-part", type=int, default=100_000,
                        help="caption files: rows per output part (default: %(default)s)")
    parser.add_argument("--caption-column", default=None, help="caption files: default caption or text")
    parser.add_argument("--key-column", default=None, help="caption files: default key or id, else the row number")
    parser.add_argument("--seed", type=int, default=0, help="weights of randomly initialised models")
    parser.add_argument("--cache-dir", default=None,
                        help="converted raw inputs (default: $POLYMODAL_CACHE or ~/.cache/polymodal)")
    parser.add_argument("--overwrite", action="store_true", help="discard what OUTPUT holds and start over")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_embed)


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("embeddings", help="a `polymodal embed` output folder")
    parser.add_argument("--kind", choices=["image", "text", "both"], default="both",
                        help="which embeddings to index (default: every kind the folder has)")
    parser.add_argument("--factory", default=None,
                        help="faiss index_factory string, e.g. Flat, IVF1024,Flat, HNSW32 (default: Flat below "
                             "100,000 rows, else IVF with 4*sqrt(rows) lists)")
    parser.set_defaults(func=cmd_index)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="text, or the path of an image file")
    parser.add_argument("--embeddings", required=True, help="a `polymodal embed` output folder with an index")
    parser.add_argument("--kind", choices=["image", "text"], default="image",
                        help="search the image or the caption embeddings (default: %(default)s)")
    parser.add_argument("-k", type=int, default=10, help="results (default: %(default)s)")
    parser.add_argument("--model", default=None, help="default: the model that made the embeddings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the hits as JSON lines")
    parser.set_defaults(func=cmd_search)


def _first_sample_has_caption(url: str) -> bool:
    from polymodal.data.tar_samples import iter_shard

    first = next(iter_shard(url, None), (0, {}))[1]
    return "txt" in first


def _what(choice: str, inputs, encoder) -> tuple[str, ...]:
    if inputs.is_table:
        if choice in ("image", "both"):
            raise ConfigError("a caption file has no images: use --what text (or auto)")
        what = ("text",)
    elif choice == "auto":
        caption = encoder.has_text and _first_sample_has_caption(inputs.parts[0].url)
        what = ("img", "text") if caption else ("img",)
    else:
        what = {"image": ("img",), "text": ("text",), "both": ("img", "text")}[choice]
    if "text" in what and not encoder.has_text:
        raise ConfigError(f"model {encoder.name} has no text tower: it can embed images only")
    return what


def _barrier(world) -> None:
    import torch.distributed as dist

    if world.world_size > 1:
        dist.barrier()


def cmd_embed(args: argparse.Namespace) -> int:
    from polymodal.distributed import Placement
    from polymodal.embed.inputs import resolve_inputs
    from polymodal.embed.layout import check_info, finished_parts, start_output
    from polymodal.embed.run import EmbedOptions, embed_parts
    from polymodal.eval.encoders import load_seeded_encoder
    from polymodal.eval.features import gather_objects
    from polymodal.eval.tasks import cache_folder
    from polymodal.pretrain.distributed import shutdown, start_process_group

    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be at least 1 and --workers at least 0")
    out = Path(args.output)
    world = start_process_group()
    try:
        resolve = lambda: resolve_inputs(args.input, cache_dir=cache_folder(args.cache_dir) / "datasets",  # noqa: E731
                                         rows_per_part=args.rows_per_part, caption_column=args.caption_column,
                                         key_column=args.key_column, quiet=args.quiet or not world.is_main)
        if world.is_main:  # a raw input is converted once, by rank 0; the others then find it in the cache
            inputs = resolve()
        _barrier(world)
        if not world.is_main:
            inputs = resolve()
        device = args.device or str(world.device)
        encoder = load_seeded_encoder(args.model, args.image_size, args.seed, device)
        what = _what(args.what, inputs, encoder)
        info = {"model": args.model, "inputs": inputs.description, "what": list(what), "dtype": args.dtype,
                "normalize": not args.no_normalize, "image_size": encoder.image_size if "img" in what else None,
                "rows_per_part": args.rows_per_part if inputs.is_table else None, "parts": len(inputs.parts),
                "caption_column": inputs.caption_column, "key_column": inputs.key_column, "seed": args.seed}
        resuming = not args.overwrite and check_info(out, info)
        _barrier(world)
        if world.is_main and not resuming:
            start_output(out, info, args.overwrite)
        _barrier(world)
        done = finished_parts(out)
        pending = [p for p in inputs.parts if p.index not in done]
        _barrier(world)  # every rank has listed the finished parts before any rank writes one
        opts = EmbedOptions(what=what, batch_size=args.batch_size, num_workers=args.workers, device=device,
                            precision=args.precision, dtype=args.dtype, normalize=not args.no_normalize,
                            progress=not args.quiet)
        t0 = time.perf_counter()
        stats = embed_parts(encoder, inputs, pending, out, opts, Placement(world.rank, world.world_size))
        everyone = gather_objects(stats, Placement(world.rank, world.world_size))
        if world.is_main:
            rows, skipped = sum(s["rows"] for s in everyone), sum(s["skipped"] for s in everyone)
            seconds = time.perf_counter() - t0
            kept = f"; {len(done)} finished part(s) kept from an earlier run" if done else ""
            print(f"embedded {rows} samples ({'+'.join(what)}) in {seconds:.0f}s ({rows / max(seconds, 1e-9):.0f} "
                  f"samples/s, {world.world_size} rank(s)) into {out}: {sum(s['parts_written'] for s in everyone)} "
                  f"part(s) written{kept}; {skipped} sample(s) skipped"
                  + (f" (listed in {out / 'skipped'})" if skipped else ""))
    finally:
        shutdown()
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from polymodal.embed.index import build_index
    from polymodal.embed.layout import part_numbers

    out = Path(args.embeddings)
    kinds = {"image": ["img"], "text": ["text"], "both": ["img", "text"]}[args.kind]
    if args.kind == "both":
        kinds = [k for k in kinds if part_numbers(out, k)] or kinds
    for kind in kinds:
        t0 = time.perf_counter()
        built = build_index(out, kind, args.factory)
        print(f"{built['index']}: {built['rows']} rows of {built['dim']} dims from {built['parts']} part(s), "
              f"{built['factory']}, {time.perf_counter() - t0:.1f}s")
    return 0


def _query_embedding(query: str, encoder, device: str):
    import random

    import torch

    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import SampleDecoder

    with torch.no_grad():
        path = Path(query)
        if path.is_file():
            ext = path.suffix.lstrip(".").lower()
            decoder = SampleDecoder(DataConfig(shards="-", modalities=["rgb"], image_size=encoder.image_size,
                                               augment=False))
            try:
                rgb = decoder({"__key__": path.stem, "__url__": str(path), ext: path.read_bytes()},
                              random.Random(0))["rgb"]
            except Exception as exc:
                raise ConfigError(f"cannot read image {query}: {exc}") from None
            return encoder.encode_image(rgb.unsqueeze(0).to(device))[0].cpu().numpy()
        tokens = torch.as_tensor(encoder.tokenizer()(query)).unsqueeze(0).to(device)
        return encoder.encode_text(tokens)[0].cpu().numpy()


def cmd_search(args: argparse.Namespace) -> int:
    from polymodal.embed.index import search
    from polymodal.embed.layout import INFO
    from polymodal.eval.encoders import load_seeded_encoder

    out = Path(args.embeddings)
    info_path = out / INFO
    if not info_path.is_file():
        raise ConfigError(f"{out} is not a `polymodal embed` output folder (no {INFO})")
    info = json.loads(info_path.read_text())
    encoder = load_seeded_encoder(args.model or info["model"], info.get("image_size"), info.get("seed", 0),
                                  args.device)
    query = _query_embedding(args.query, encoder, args.device)
    if not info.get("normalize", True):
        query = query / max(float((query ** 2).sum()) ** 0.5, 1e-12)
    hits = search(out, query, "img" if args.kind == "image" else "text", args.k)
    for rank, hit in enumerate(hits, 1):
        if args.json:
            print(json.dumps(hit, default=str))
            continue
        caption = str(hit.get("caption") or "").replace("\n", " / ")
        print(f"{rank:3d}  {hit['score']:.4f}  {hit['key']}  {caption[:100]}")
    return 0
