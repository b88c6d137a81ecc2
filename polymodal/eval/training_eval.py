"""End-of-training evaluation of a two-tower model: text<->image retrieval on held-out pairs and zero-shot
classification, run by every rank of the training's process group.

`evaluate_held_out` is what the contrastive objectives' `evaluate` hook calls once the weights are exported: with
`TaskOptions(distributed=True)` inside an initialised process group, each rank encodes its share of the images
(`features.extract_features`) and of the texts (`tasks.encode_texts`), the parts are all-gathered, and every rank
computes and returns the same metrics. Outside a process group (or with `distributed=False`) it runs alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from polymodal.data.errors import ConfigError
from polymodal.eval.datasets import EvalDataset, resolve_dataset
from polymodal.eval.features import gather_objects, world_for
from polymodal.eval.tasks import TaskOptions, cache_folder, zeroshot_classification, zeroshot_retrieval


class HeldOutReport(NamedTuple):
    """`metrics`: {"retrieval" (one retrieval set) or "retrieval:SPEC" (each of several): zeroshot_retrieval's
    metrics, "zeroshot:SPEC": zeroshot_classification's metrics}; `lines`: a printable table of them."""

    metrics: dict[str, dict]
    lines: list[str]


def _resolve_everywhere(specs: list[str], cache_dir: Path, opts: TaskOptions) -> list[EvalDataset]:
    """Resolve the dataset specs on every rank. A raw source is converted into shards once: rank 0 converts first,
    then the others find the converted shards; an error on rank 0 is raised on every rank (no rank is left
    waiting in a collective)."""
    world = world_for(opts)
    if world.world_size == 1:
        return [resolve_dataset(spec, cache_dir=cache_dir, quiet=not opts.progress) for spec in specs]
    failure: Exception | None = None
    if world.rank == 0:
        try:
            for spec in specs:
                resolve_dataset(spec, cache_dir=cache_dir, quiet=not opts.progress)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure = exc
    # Also the barrier: the other ranks read what rank 0 converted.
    error = gather_objects({"error": None if failure is None else f"{type(failure).__name__}: {failure}"},
                           world)[0]["error"]
    if failure is not None:
        raise failure
    if error is not None:
        raise ConfigError(f"rank 0 could not resolve the evaluation datasets: {error}")
    return [resolve_dataset(spec, cache_dir=cache_dir, quiet=True) for spec in specs]


def evaluate_held_out(encoder, retrieval: Sequence[str], zeroshot: Sequence[str], opts: TaskOptions, *,
                      dataset_cache: str | Path | None = None) -> HeldOutReport:
    """Retrieval on each of `retrieval` (held-out image-caption shard specs) and zero-shot classification on each of
    `zeroshot` (any `polymodal eval` dataset spec with class names) for `encoder` (an `encoders.Encoder` with a
    text tower, on `opts.device`).

    With `opts.distributed` inside an initialised process group every rank must call this with the same
    arguments; each encodes its share and all return the same report. Raw sources are converted into shards under
    `dataset_cache` (default: the eval cache's `datasets/` folder, $POLYMODAL_CACHE or ~/.cache/polymodal). Image
    features are cached only when `opts.cache_dir` is set (a training run's freshly exported weights usually have
    nothing to reuse). Recall is at `opts.ks` (the table shows those k).
    """
    retrieval, zeroshot = list(retrieval), list(zeroshot)
    if not retrieval and not zeroshot:
        raise ConfigError("evaluate_held_out: no retrieval shards and no zero-shot datasets to evaluate on")
    if not encoder.has_text:
        raise ConfigError(f"model {encoder.name} has no text tower: retrieval and zero-shot need an image-text model")
    cache = Path(dataset_cache) if dataset_cache is not None else cache_folder(None) / "datasets"
    datasets = _resolve_everywhere(retrieval + zeroshot, cache, opts)
    ks = tuple(opts.ks)
    metrics: dict[str, dict] = {}
    lines: list[str] = []
    for spec, dataset in zip(retrieval, datasets[:len(retrieval)]):
        result = zeroshot_retrieval(encoder, dataset, opts)
        metrics["retrieval" if len(retrieval) == 1 else f"retrieval:{spec}"] = result
        lines += [f"retrieval on {result['images']} held-out pairs ({spec}):",
                  f"{'':<14}" + "".join(f"{f'R@{k}':>8}" for k in ks)]
        for label, key in (("text->image", "image_retrieval"), ("image->text", "text_retrieval")):
            lines.append(f"{label:<14}" + "".join(f"{100 * result[f'{key}_recall@{k}']:>7.1f}%" for k in ks))
    if zeroshot:
        lines.append(f"zero-shot classification:{'':<15}{'top-1':>8}{'top-5':>8}{'mean recall':>13}")
    for spec, dataset in zip(zeroshot, datasets[len(retrieval):]):
        result = metrics[f"zeroshot:{spec}"] = zeroshot_classification(encoder, dataset, opts)
        lines.append(f"  {spec[-36:]:<38}{100 * result['acc1']:>7.1f}%{100 * result['acc5']:>7.1f}%"
                     f"{100 * result['mean_per_class_recall']:>12.1f}%")
    return HeldOutReport(metrics, lines)
