"""The embedded demo data (emoji image-caption shards shipped inside the package) and its stream check.

`polymodal data demo` streams the demo shards through the full reading pipeline (split across workers,
shuffled, decoded, augmented, batched), prints a summary table and writes a grid of the first batch to a PNG.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from polymodal.data.config import DataConfig
from polymodal.data.errors import summarize
from polymodal.data.pipeline import ShardLoader


def demo_dir() -> Path:
    return Path(str(resources.files("polymodal") / "demo_data"))


def demo_shards() -> str:
    return str(demo_dir() / "train")


def batch_grid(batch: dict, columns: int = 8, cell: int = 96) -> Image.Image:
    """A contact sheet: each image of the batch with the first words of its caption under it."""
    images = batch["rgb"].permute(0, 2, 3, 1).numpy()
    captions = batch.get("caption", [""] * len(images))
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (pixels, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        sheet.paste(Image.fromarray(np.ascontiguousarray(pixels)).resize((cell, cell)), (x, y))
        draw.text((x + 2, y + cell), str(caption)[:15], fill="black")
    return sheet


def run_demo(out_dir: str | Path, batch_size: int = 64, num_workers: int = 2, epochs: int = 1) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DataConfig(shards=[demo_shards()], modalities=["rgb", "caption"], batch_size=batch_size,
                     num_workers=num_workers, image_size=64, crop_scale=[0.5, 1.0])
    loader = ShardLoader(cfg)
    started = time.perf_counter()
    samples = batches = 0
    for _ in range(epochs):
        for batch in loader:
            if batches == 0:
                batch_grid(batch).save(out / "demo_batch.png")
            samples += len(batch["__key__"])
            batches += 1
    seconds = time.perf_counter() - started
    return {"shards": len(loader.urls), "samples": samples, "batches": batches, "epochs": epochs,
            "workers": loader.num_workers, "seconds": round(seconds, 2),
            "samples_per_s": round(samples / seconds, 1), "skipped": summarize(loader.skip_counts()),
            "grid": str(out / "demo_batch.png")}
