"""Classification metrics with CLIP_benchmark's definitions, shared by the zero-shot, linear-probe and kNN
evaluations: top-1 and top-5 accuracy over all samples, and recall averaged over the classes present in the labels
(so a class absent from the test set does not count as a recall of 0).
"""

from __future__ import annotations

import torch


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor,
                           num_classes: int | None = None) -> dict[str, float]:
    """`scores` [N, num_classes] (higher is better), `labels` [N] class indices."""
    num_classes = scores.shape[1] if num_classes is None else num_classes
    if scores.ndim != 2 or scores.shape[1] != num_classes or len(labels) != len(scores) or len(labels) == 0:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} do not fit "
                         f"{num_classes} classes (or are empty)")
    labels = labels.to(scores.device, torch.long)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct1 = (top[:, 0] == labels).float()
    hits = torch.zeros(num_classes, device=scores.device).index_add_(0, labels, correct1)
    counts = torch.bincount(labels, minlength=num_classes).float()
    seen = counts > 0
    # Exact counts over n, as CLIP_benchmark's accuracy (a float32 mean would be off in the 8th digit).
    return {"acc1": int(correct1.sum()) / len(labels),
            "acc5": int((top == labels[:, None]).any(dim=1).sum()) / len(labels),
            "mean_per_class_recall": float((hits[seen] / counts[seen]).mean())}
