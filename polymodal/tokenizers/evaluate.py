"""Held-out figures of a trained image tokenizer: reconstruction loss, PSNR, SSIM (torchmetrics), the share of
the codebook the held-out set uses, and the perplexity of its codes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from polymodal.data.errors import ConfigError


def evaluate_tokenizer(run: str, shards: str, batch_size: int = 256, limit: int | None = None, workers: int = 2,
                       show_progress: bool = True, join: list[str] | None = None) -> dict:
    """`join`: shard sets joined to `shards` by key (data.join), e.g. the derived edges an edges tokenizer reads."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.progress import progress_bar
    from polymodal.tokenizers.registry import load_image_tokenizer

    objective, size = load_image_tokenizer(run)
    modality = objective.config.modality
    cfg = DataConfig(shards=[shards], join=list(join or []), modalities=[modality], image_size=size, augment=False,
                     batch_size=batch_size, num_workers=workers, shuffle_buffer=0)
    tok, vocab = objective.tokenizer_model, objective.tokenizer_model.vocab_size
    counts = torch.zeros(vocab, dtype=torch.long)
    sums = {"recon_loss": 0.0, "psnr": 0.0, "ssim": 0.0}
    seen, t0 = 0, time.perf_counter()
    grid: list[torch.Tensor] = []  # the first held-out images and their reconstructions from tokens
    bar = progress_bar(total=limit, desc="tokenizer eval", unit="img", disable=not show_progress)
    with torch.no_grad():
        for batch in ShardLoader(cfg):
            x = objective.inputs(batch)
            if limit is not None:
                x = x[: limit - seen]
            recon, ids, _ = tok(x)
            counts += torch.bincount(ids.flatten(), minlength=vocab)
            n = len(x)
            if objective.config.classes:
                sums["recon_loss"] += float(tok.reconstruction_loss(recon, x)) * n
            else:
                recon = recon.float().clamp(-1, 1)
                if not grid:
                    grid = [x[:16].float(), recon[:16]]
                per_image = (recon - x.float()).square().flatten(1).mean(1)
                sums["recon_loss"] += float(per_image.sum())
                sums["psnr"] += float((10 * torch.log10(4.0 / per_image.clamp_min(1e-10))).sum())
                sums["ssim"] += float(ssim(recon, x.float(), data_range=2.0)) * n
            seen += n
            bar.update(n)
            if limit is not None and seen >= limit:
                break
    bar.close()
    if not seen:
        raise ConfigError(f"{shards}: no {modality!r} samples to evaluate")
    p = counts.float() / counts.sum()
    metrics = {k: v / seen for k, v in sums.items() if not (objective.config.classes and k != "recon_loss")}
    metrics |= {"codebook_usage": float((counts > 0).float().mean()),
                "perplexity": float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())), "vocab_size": vocab,
                "images": seen, "image_size": size, "fingerprint": tok.fingerprint,
                "seconds": round(time.perf_counter() - t0, 1)}
    return {"model": str(run), "dataset": shards, "task": "tokenizer_reconstruction", "metrics": metrics,
            "grid": grid}


def write_result(result: dict, output: str) -> Path:
    """The JSON, and beside it a PNG of held-out inputs (top row) over their reconstructions from tokens."""
    from torchvision.utils import save_image

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(result['model']).name}_tokenizer_reconstruction"
    grid = result.pop("grid", None)
    if grid:
        save_image(((torch.cat(grid) + 1) / 2).clamp(0, 1), str(out / f"{stem}.png"), nrow=len(grid[0]), padding=2)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    return path
