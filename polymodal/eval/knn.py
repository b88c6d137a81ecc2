"""Weighted k-nearest-neighbour classification on precomputed features, as DINO's eval_knn.py: cosine similarity of
L2-normalised features, the k most similar training samples vote for their class with weight exp(sim / T).

Test rows are processed in chunks, so memory is chunk_size x n_train, never the full test x train matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.eval.metrics import classification_metrics


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, k: int = 20,
               temperature: float = 0.07, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Per-class vote totals [n_test, num_classes] on train_x's device, in float32 (float64 if train_x is float64);
    k is capped at the number of train rows."""
    train = torch.as_tensor(train_x)
    dtype = torch.float64 if train.dtype == torch.float64 else torch.float32
    train = F.normalize(train.to(dtype), dim=1)
    test = F.normalize(torch.as_tensor(test_x).to(train.device, dtype), dim=1)
    train_y = torch.as_tensor(train_y).to(train.device, torch.long)
    k = min(k, len(train))
    votes = torch.zeros(len(test), num_classes, device=train.device, dtype=dtype)
    for start in range(0, len(test), chunk_size):
        sims, neighbours = (test[start:start + chunk_size] @ train.T).topk(k, dim=1)
        labels, weights = train_y[neighbours], (sims / temperature).exp()
        chunk = votes[start:start + chunk_size]
        # One neighbour rank at a time: each row gets one addition per call, so the sum is in rank order and
        # deterministic on GPU too (a single scatter_add over all k would race on the atomics).
        for rank in range(k):
            chunk.scatter_add_(1, labels[:, rank:rank + 1], weights[:, rank:rank + 1])
    return votes


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 1024) -> dict:
    """Top-1/top-5 accuracy and mean per-class recall of the weighted kNN vote (num_classes: from the labels)."""
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    if num_classes is None:
        num_classes = max(int(train_y.max()), int(test_y.max())) + 1
    scores = knn_scores(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes,
                        chunk_size=chunk_size)
    return {**classification_metrics(scores, test_y, num_classes), "k": min(k, len(train_y)),
            "temperature": temperature}
