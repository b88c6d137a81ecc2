"""Linear probe and kNN evaluation on real features: Fashion-MNIST pixels, 2x2 average-pooled to 196 dimensions,
3,000 training images (from the train file) and 1,500 test images (from t10k).

The probe matches scikit-learn's LogisticRegression swept over the same C grid on the same split; kNN matches a
plain full-matrix numpy implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from polymodal.data.idx import read_idx
from polymodal.eval.knn import knn_classify, knn_scores
from polymodal.eval.linear_probe import (DEFAULT_CS, few_shot_indices, fit_softmax_regression, linear_probe,
                                         stratified_split)

CS = (1e-3, 1e-2, 1e-1, 1.0)


def _pooled(images: np.ndarray) -> np.ndarray:
    return images.reshape(-1, 14, 2, 14, 2).astype(np.float32).mean(axis=(2, 4)).reshape(len(images), -1) / 255


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These problems are small: one thread each for torch and for sklearn's BLAS/OpenMP. With two threads per
    library on a busy 2-core machine, spin-waiting made the sweeps 10x (sklearn 60x) slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion(data_root) -> dict[str, torch.Tensor]:
    root = data_root / "fashion-mnist"
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", 3000), ("test", "t10k", 1500)):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.sort(rng.choice(len(labels), n, replace=False))
        out[f"{split}_x"] = torch.from_numpy(_pooled(images[keep]))
        out[f"{split}_y"] = torch.from_numpy(labels[keep].astype(np.int64))
    return out


def _standardised(fashion) -> tuple[np.ndarray, np.ndarray]:
    """What linear_probe does to the features before fitting, for sklearn."""
    train, test = fashion["train_x"].numpy().astype(np.float64), fashion["test_x"].numpy().astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std <= 1e-12] = 1
    return (train - mean) / std, (test - mean) / std


def test_probe_matches_sklearn_sweep(fashion):
    ours = linear_probe(fashion["train_x"], fashion["train_y"], fashion["test_x"], fashion["test_y"], regs=CS,
                        patience=None)

    train_x, test_x = _standardised(fashion)
    train_y, test_y = fashion["train_y"].numpy(), fashion["test_y"].numpy()
    fit, val = (i.numpy() for i in stratified_split(fashion["train_y"], 0.2, seed=0))
    val_acc = {C: LogisticRegression(C=C, max_iter=1000).fit(train_x[fit], train_y[fit])
               .score(train_x[val], train_y[val]) for C in CS}
    best_C = max(CS, key=val_acc.get)
    sk_acc1 = LogisticRegression(C=best_C, max_iter=1000).fit(train_x, train_y).score(test_x, test_y)

    assert ours["train_samples"] == 3000 and ours["test_samples"] == 1500
    assert ours["val_samples"] == len(val) and abs(len(val) - 600) <= 5  # 20% of each class, rounded
    assert set(ours["val_acc1_per_C"]) == set(CS)
    for C in CS:
        assert abs(ours["val_acc1_per_C"][C] - val_acc[C]) <= 0.01, (C, ours["val_acc1_per_C"], val_acc)
    assert abs(ours["acc1"] - sk_acc1) <= 0.01, (ours, sk_acc1)
    assert ours["acc1"] > 0.78  # measured 0.812 (sklearn 0.812); chance is 0.1
    assert ours["acc1"] <= ours["acc5"] and 0.7 < ours["mean_per_class_recall"] <= 1


def test_sweep_stops_past_the_peak_with_the_same_result(fashion):
    # The default grid from 1e-4 up: the early-stopped sweep tries a prefix of it, ends `patience` C's after its
    # best, and (warm starts follow the same path) picks the same C with the same test numbers as the full sweep.
    args = (fashion["train_x"], fashion["train_y"], fashion["test_x"], fashion["test_y"])
    early = linear_probe(*args, patience=2)
    grid = sorted(DEFAULT_CS)
    tried = sorted(early["val_acc1_per_C"])
    assert tried == grid[:len(tried)] and len(tried) < len(grid), tried
    assert tried.index(early["best_C"]) == len(tried) - 3, early["val_acc1_per_C"]
    full = linear_probe(*args, patience=None)
    assert sorted(full["val_acc1_per_C"]) == grid
    assert full["best_C"] == early["best_C"]
    assert (full["acc1"], full["acc5"]) == (early["acc1"], early["acc5"])


def test_penalty_is_sklearn_C(fashion):
    # The same C must give the same minimiser: a penalty off by a factor of 2 moves the weights by 30%.
    # In float64 and to a tight tolerance, so that what is left is the difference between the two optimisers.
    train_x, _ = _standardised(fashion)
    y = fashion["train_y"]
    w, b = fit_softmax_regression(torch.from_numpy(train_x), y, 10, C=0.01, tol=1e-6)
    sk = LogisticRegression(C=0.01, max_iter=1000, tol=1e-6).fit(train_x, y.numpy())
    # The intercepts are defined up to a common shift (softmax): compare them centred.
    w_err = float(np.abs(w.numpy() - sk.coef_).max() / np.abs(sk.coef_).max())
    b_err = float(np.abs((b - b.mean()).numpy() - (sk.intercept_ - sk.intercept_.mean())).max())
    assert w_err < 1e-3 and b_err < 1e-3, (w_err, b_err)


def test_few_shot_keeps_k_per_class(fashion):
    y = fashion["train_y"]
    keep = few_shot_indices(y, 5, seed=3)
    assert torch.bincount(y[keep], minlength=10).tolist() == [5] * 10
    assert len(torch.unique(keep)) == 50
    assert torch.equal(keep, few_shot_indices(y, 5, seed=3))
    assert not torch.equal(keep, few_shot_indices(y, 5, seed=4))

    first, second = (linear_probe(fashion["train_x"], fashion["train_y"], fashion["test_x"], fashion["test_y"],
                                  few_shot_k=10, seed=1) for _ in range(2))
    assert first["train_samples"] == 100 and first["val_samples"] == 20 and first["test_samples"] == 1500
    assert first == second  # deterministic for a seed
    assert first["acc1"] > 0.6  # measured 0.707 with 10 images per class (seeds 0, 2: 0.676, 0.710)


def _reference_knn_scores(train_x, train_y, test_x, k, temperature, num_classes) -> np.ndarray:
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = test @ train.T
    scores = np.zeros((len(test), num_classes))
    for row in range(len(test)):
        for j in np.argsort(-sims[row])[:k]:
            scores[row, train_y[j]] += np.exp(sims[row, j] / temperature)
    return scores


def test_knn_matches_reference(fashion):
    train_x, train_y = fashion["train_x"][:1000].double().numpy(), fashion["train_y"][:1000].numpy()
    test_x, test_y = fashion["test_x"][:300].double().numpy(), fashion["test_y"][:300].numpy()
    ref = _reference_knn_scores(train_x, train_y, test_x, 20, 0.07, 10)
    # float64 throughout: the 20th and 21st neighbours' similarities come within 1e-6 of each other here, which
    # float32 rounding could swap.
    # Chunks of 64 do not divide the 300 test rows: the last chunk is a short one.
    ours = knn_scores(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                      k=20, temperature=0.07, num_classes=10, chunk_size=64)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4)
    assert np.array_equal(ours.argmax(dim=1).numpy(), ref.argmax(axis=1))

    result = knn_classify(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                          torch.from_numpy(test_y), k=20, temperature=0.07, chunk_size=64)
    correct = ref.argmax(axis=1) == test_y
    assert result["acc1"] == pytest.approx(correct.mean(), abs=1e-6)
    recall = [correct[test_y == c].mean() for c in np.unique(test_y)]
    assert result["mean_per_class_recall"] == pytest.approx(np.mean(recall), abs=1e-6)
    # Classes without votes tie at 0, so top-5 is exact only between "strictly fewer than 5 classes score higher"
    # and "fewer than 5 other classes score at least as high".
    label_score = ref[np.arange(len(test_y)), test_y][:, None]
    optimistic = ((ref > label_score).sum(axis=1) < 5).mean()
    pessimistic = ((ref >= label_score).sum(axis=1) - 1 < 5).mean()
    assert pessimistic - 1e-6 <= result["acc5"] <= optimistic + 1e-6
    assert result["k"] == 20 and result["temperature"] == 0.07


def test_knn_accuracy_on_fashion_mnist(fashion):
    result = knn_classify(fashion["train_x"], fashion["train_y"], fashion["test_x"], fashion["test_y"])
    assert result["acc1"] > 0.7  # measured 0.757 (k=20, T=0.07); chance is 0.1
    assert result["acc1"] <= result["acc5"] and result["acc5"] > 0.95
    assert knn_classify(fashion["train_x"][:10], fashion["train_y"][:10], fashion["test_x"],
                        fashion["test_y"], k=20)["k"] == 10
