"""A suite run: every model x dataset x task, one JSON per result, and for several results a CSV, a markdown
table and a bar chart.

Each JSON has CLIP_benchmark's layout ({"dataset", "model", "pretrained", "task", "metrics", "language"}) plus
the seconds it took; its name is `{dataset}_{model}_{task}.json`. Only rank 0 writes; every rank computes.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

from polymodal.data.errors import ConfigError
from polymodal.eval.datasets import EvalDataset
from polymodal.eval.encoders import cache_identity
from polymodal.eval.tasks import RUNNERS, TaskOptions, tasks_for

log = logging.getLogger("polymodal")

# The figure each task is judged by, for the table and the chart.
HEADLINE = {"zeroshot_classification": "acc1", "zeroshot_retrieval": "image_retrieval_recall@1",
            "linear_probe": "lp_acc1", "knn": "knn_acc1"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "x"


def model_label(spec: str) -> str:
    """A short name for a model spec: `open_clip-NAME`, `timm-NAME`, or the run folder's / file's name."""
    kind, _, rest = spec.partition(":")
    if kind in ("open_clip", "timm") and rest:
        return f"{kind}-{rest.split(':')[0]}"
    path = Path(spec)
    return (path.parent if path.name == "model.safetensors" else path).name or spec


def run_suite(models: list[str], load: Callable[[str], Any], datasets: list[EvalDataset], tasks: list[str],
              opts: TaskOptions, output: Path, is_main: bool = True) -> list[dict]:
    """`models`: specs, each loaded by `load` in turn. Returns the result records (rank 0 also writes them)."""
    results = []
    for spec in models:
        encoder = load(spec)
        opts.model_id = cache_identity(spec, opts.seed)
        for dataset in datasets:
            chosen = tasks_for(encoder, dataset, tasks)
            if not chosen:
                log.warning("no task fits model %s on dataset %s; skipped", spec, dataset.name)
            for task in chosen:
                if task not in RUNNERS:
                    raise ConfigError(f"unknown task {task!r}; choose from {', '.join(RUNNERS)} or auto")
                t0 = time.perf_counter()
                metrics = RUNNERS[task](encoder, dataset, opts)
                record = {"dataset": dataset.name, "model": model_label(spec), "pretrained": spec, "task": task,
                          "metrics": metrics, "language": "en", "seconds": round(time.perf_counter() - t0, 2)}
                results.append(record)
                if is_main:
                    output.mkdir(parents=True, exist_ok=True)
                    name = f"{_safe(dataset.name)}_{_safe(model_label(spec))}_{task}.json"
                    (output / name).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
                    print(_line(record), flush=True)
    if is_main and len(results) > 1:
        write_tables(results, output)
    return results


def _line(record: dict) -> str:
    key = HEADLINE[record["task"]]
    m = record["metrics"]
    extra = "".join(f"  {k} {100 * m[k]:.2f}" for k in ("acc5", "lp_acc5", "knn_acc5", "image_retrieval_recall@5",
                                                       "text_retrieval_recall@1") if k in m)
    return (f"{record['model']:<28} {record['dataset']:<20} {record['task']:<24} {key} {100 * m[key]:.2f}{extra}"
            f"  ({record['seconds']:.0f}s)")


def flat_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        row = {k: r[k] for k in ("model", "pretrained", "dataset", "task", "seconds")}
        row.update({k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        rows.append(row)
    return rows


def write_tables(results: list[dict], output: Path) -> None:
    """results.csv (every numeric metric), results.md and results.png (each task's headline figure)."""
    rows = flat_rows(results)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(output / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    models = list(dict.fromkeys(r["model"] for r in results))
    cells = list(dict.fromkeys((r["dataset"], r["task"]) for r in results))
    value = {(r["model"], r["dataset"], r["task"]): 100 * r["metrics"][HEADLINE[r["task"]]] for r in results}
    header = "| dataset | task (metric) | " + " | ".join(models) + " |"
    lines = [header, "|" + "---|" * (len(models) + 2)]
    for dataset, task in cells:
        lines.append(f"| {dataset} | {task} ({HEADLINE[task]}) | " + " | ".join(
            f"{value[(m, dataset, task)]:.2f}" if (m, dataset, task) in value else "" for m in models) + " |")
    (output / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _bar_chart(models, cells, value, output / "results.png")


def _bar_chart(models: list[str], cells: list[tuple[str, str]], value: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cells) * max(1, len(models)) ** 0.5), 4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(cells))]
        ax.bar(xs, [value.get((model, d, t), 0.0) for d, t in cells], width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))])
    ax.set_xticklabels([f"{d}\n{t}" for d, t in cells], fontsize=8)
    ax.set_ylabel("% (top-1 accuracy or R@1)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
