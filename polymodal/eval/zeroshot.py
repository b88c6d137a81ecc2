"""Zero-shot classification with CLIP_benchmark's definitions: class embeddings are the normalised mean of the
prompt-template embeddings; top-1, top-5 and mean per-class recall.

Datasets are in CLIP_benchmark's layout, as `polymodal data shards --split` writes it: shards in DIR/SPLIT,
`classnames.txt` and `zeroshot_classification_templates.txt` in DIR (or in the shard folder itself).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dataset_files(shards: str) -> tuple[list[str], list[str]]:
    """Class names and templates ('{c}' placeholders) beside the shard folder."""
    folder = Path(shards)
    for where in (folder, folder.parent):
        if (where / "classnames.txt").is_file():
            templates = where / "zeroshot_classification_templates.txt"
            return _lines(where / "classnames.txt"), _lines(templates) if templates.is_file() else ["a photo of a {c}."]
    raise ConfigError(f"zero-shot dataset {shards}: no classnames.txt in it or its parent (write it with "
                      "`polymodal data shards ... --split NAME`)")


@torch.no_grad()
def class_embeddings(model, classnames: list[str], templates: list[str]) -> torch.Tensor:
    tokenize = model.tokenizer()
    rows = []
    for name in classnames:
        tokens = torch.stack([tokenize(t.replace("{c}", name)) for t in templates])
        rows.append(F.normalize(model.encode_text(tokens).float().mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zeroshot_classification(model, shards: str, image_size: int, batch_size: int = 256) -> dict[str, float]:
    classnames, templates = dataset_files(shards)
    classes = class_embeddings(model, classnames, templates)
    cfg = DataConfig(shards=shards, modalities=["rgb", "label"], batch_size=batch_size, num_workers=0,
                     shuffle_shards=False, shuffle_buffer=0, image_size=image_size, augment=False)
    top1 = top5 = total = 0
    per_class_hits = torch.zeros(len(classnames))
    per_class_count = torch.zeros(len(classnames))
    for batch in ShardLoader(cfg, where=Placement(0, 1)):
        scores = model.encode_image(batch["rgb"]).float() @ classes.T
        labels = batch["label"]
        best = scores.topk(min(5, len(classnames)), dim=1).indices
        correct1 = best[:, 0] == labels
        top1 += int(correct1.sum())
        top5 += int((best == labels[:, None]).any(dim=1).sum())
        total += len(labels)
        per_class_hits.index_add_(0, labels, correct1.float())
        per_class_count.index_add_(0, labels, torch.ones(len(labels)))
    seen = per_class_count > 0
    return {"acc1": top1 / total, "acc5": top5 / total,
            "mean_per_class_recall": float((per_class_hits[seen] / per_class_count[seen]).mean()), "samples": total}
