"""The evaluation tasks: each takes an encoder, a dataset and run options and returns CLIP_benchmark-named metrics.

  zeroshot_classification   acc1, acc5, mean_per_class_recall (class embedding: normalised mean of the
                            normalised prompt embeddings; scores: cosine, as CLIP_benchmark's 100 * cos ranks alike)
  zeroshot_retrieval        image_retrieval_recall@k (text -> image), text_retrieval_recall@k (image -> text);
                            ties with other keys count against the query (retrieval.py)
  linear_probe              lp_acc1, lp_acc5, lp_mean_per_class_recall, best_C (fit on the train split)
  knn                       knn_acc1, knn_acc5, knn_mean_per_class_recall (cosine, k=20, T=0.07, as DINO)

Image features come from `features.extract_features` (all ranks encode, everyone gets everything), so every
rank returns the same metrics. Text is split across ranks the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from polymodal.data.errors import ConfigError
from polymodal.eval.datasets import EvalDataset
from polymodal.eval.features import (Features, RunOptions, autocast, cache_path, extract_features,
                                      gather_objects, world_for)
from polymodal.eval.linear_probe import DEFAULT_PATIENCE
from polymodal.eval.metrics import classification_metrics

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "knn")


@dataclass
class TaskOptions(RunOptions):
    cache_dir: str | None = None  # image features cached here (linear probe / kNN reuse them)
    model_id: str = ""  # identifies the model in cache keys
    text_batch_size: int = 256
    few_shot: int | None = None  # linear probe: k training samples per class
    probe_cs: list[float] | None = None
    probe_patience: int | None = DEFAULT_PATIENCE  # None sweeps every C
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0
    ks: tuple[int, ...] = field(default=(1, 5, 10))


def _features(encoder, shards: str, opts: TaskOptions, **what) -> Features:
    cache = None
    if opts.cache_dir:
        modalities = ["rgb"] + [k for k, v in what.items() if v]
        cache = cache_path(opts.cache_dir, opts.model_id or encoder.name, shards, modalities, encoder.preprocessing(),
                           opts)
    return extract_features(encoder, shards, opts, cache=cache, **what)


@torch.no_grad()
def encode_texts(encoder, texts: list[str], opts: TaskOptions) -> torch.Tensor:
    """Normalised embeddings of `texts` [len, D]; each rank encodes a contiguous slice, then all are gathered."""
    world = world_for(opts)
    per_rank = -(-len(texts) // world.world_size)
    mine = texts[world.rank * per_rank:(world.rank + 1) * per_rank]
    tokenize, device = encoder.tokenizer(), torch.device(opts.device)
    out = []
    for start in range(0, len(mine), opts.text_batch_size):
        tokens = torch.stack([torch.as_tensor(tokenize(t)) for t in mine[start:start + opts.text_batch_size]])
        with autocast(device, opts.precision):
            out.append(encoder.encode_text(tokens.to(device)).float().cpu())
    local = torch.cat(out) if out else None
    parts = [p["text"] for p in gather_objects({"text": local}, world) if p["text"] is not None]
    return torch.cat(parts)


def class_embeddings(encoder, classnames: list[str], templates: list[str], opts: TaskOptions) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its normalised prompt embeddings (CLIP_benchmark's recipe)."""
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    emb = encode_texts(encoder, prompts, opts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def _need_text(encoder, task: str) -> None:
    if not encoder.has_text:
        raise ConfigError(f"task {task} needs an image-text model; {encoder.name} is image-only (use linear_probe "
                          "or knn)")


def _need_labels(dataset: EvalDataset, task: str) -> None:
    if not dataset.classnames:
        raise ConfigError(f"task {task} needs a labelled dataset; {dataset.name} has no classnames.txt")


def zeroshot_classification(encoder, dataset: EvalDataset, opts: TaskOptions) -> dict:
    _need_text(encoder, "zeroshot_classification")
    _need_labels(dataset, "zeroshot_classification")
    classes = class_embeddings(encoder, dataset.classnames, dataset.templates, opts)
    feats = _features(encoder, dataset.test, opts, labels=True)
    scores = feats.image @ classes.T
    return {**classification_metrics(scores, feats.labels, len(dataset.classnames)), "samples": len(feats.labels),
            "templates": len(dataset.templates)}


def zeroshot_retrieval(encoder, dataset: EvalDataset, opts: TaskOptions) -> dict:
    from polymodal.eval.retrieval import retrieval_metrics

    _need_text(encoder, "zeroshot_retrieval")
    feats = _features(encoder, dataset.test, opts, captions=True)
    texts, owner = [], []
    for image_index, caption in enumerate(feats.captions):
        lines = [line.strip() for line in caption.splitlines() if line.strip()]
        texts += lines
        owner += [image_index] * len(lines)
    if not texts:
        raise ConfigError(f"dataset {dataset.name}: no captions to retrieve")
    # Each distinct caption is encoded once: a caption two images share gets one embedding, so the two tie exactly
    # (ties count against the model; see retrieval.py), whichever batches the copies would have fallen in.
    distinct = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(distinct)}
    text = encode_texts(encoder, distinct, opts)[torch.tensor([where[t] for t in texts])]
    metrics = retrieval_metrics(feats.image, text, torch.tensor(owner), opts.ks)
    return {**metrics, "images": len(feats.image), "captions": len(texts)}


def _train_and_test(encoder, dataset: EvalDataset, opts: TaskOptions, task: str) -> tuple[Features, Features]:
    _need_labels(dataset, task)
    if dataset.train is None:
        raise ConfigError(f"task {task} needs a training split: dataset {dataset.name} has no train/ folder; "
                          "name one with --train")
    return _features(encoder, dataset.train, opts, labels=True), _features(encoder, dataset.test, opts, labels=True)


def linear_probe(encoder, dataset: EvalDataset, opts: TaskOptions) -> dict:
    from polymodal.eval.linear_probe import linear_probe as probe

    train, test = _train_and_test(encoder, dataset, opts, "linear_probe")
    device = torch.device(opts.device)
    result = probe(train.image.to(device), train.labels.to(device), test.image.to(device), test.labels.to(device),
                   regs=opts.probe_cs, patience=opts.probe_patience, few_shot_k=opts.few_shot, seed=opts.seed,
                   progress=opts.progress)
    renamed = {f"lp_{k}": v for k, v in result.items() if k in ("acc1", "acc5", "mean_per_class_recall")}
    return {**renamed, **{k: v for k, v in result.items() if k not in ("acc1", "acc5", "mean_per_class_recall")}}


def knn(encoder, dataset: EvalDataset, opts: TaskOptions) -> dict:
    from polymodal.eval.knn import knn_classify

    train, test = _train_and_test(encoder, dataset, opts, "knn")
    result = knn_classify(train.image, train.labels, test.image, test.labels, k=opts.knn_k,
                          temperature=opts.knn_temperature, num_classes=len(dataset.classnames))
    return {f"knn_{k}" if k in ("acc1", "acc5", "mean_per_class_recall") else k: v for k, v in result.items()}


RUNNERS: dict[str, Callable] = {"zeroshot_classification": zeroshot_classification,
                                "zeroshot_retrieval": zeroshot_retrieval, "linear_probe": linear_probe, "knn": knn}


def tasks_for(encoder, dataset: EvalDataset, asked: list[str]) -> list[str]:
    """`auto` expands to every task the model and dataset allow."""
    if "auto" not in asked:
        return asked
    if dataset.kind == "retrieval":
        return ["zeroshot_retrieval"] if encoder.has_text else []
    out = ["zeroshot_classification"] if encoder.has_text and dataset.classnames else []
    return out + (["linear_probe", "knn"] if dataset.train else [])


def cache_folder(value: str | None) -> Path:
    import os

    return Path(value or os.environ.get("POLYMODAL_CACHE", Path.home() / ".cache" / "polymodal"))
