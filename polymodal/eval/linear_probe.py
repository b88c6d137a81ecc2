"""Linear probe on precomputed features, as the CLIP paper and CLIP_benchmark evaluate representations: multinomial
logistic regression with an L2 penalty whose strength is chosen on a validation split carved out of the training
set, refit on train+val with that strength, scored on the test set.

The objective is scikit-learn's `LogisticRegression(C=C)` (multinomial, intercept not penalised) divided by C*n:

    mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C n)      (sklearn: 0.5 ||W||^2 + C sum_i CE_i)

so a given C has the same minimiser as in sklearn and results are comparable with it; the mean keeps the loss and
gradient scale independent of n. It is minimised by full-batch L-BFGS in torch on the features' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from polymodal.eval.metrics import classification_metrics
from polymodal.progress import progress_bar

# A fixed log grid rather than CLIP_benchmark's binary search: every C's validation accuracy is reported, the same
# grid can be handed to sklearn, and fitting from the strongest to the weakest penalty lets each fit start from the
# previous solution (a regularisation path), which is cheaper than the search's restarts. (Where the optimum barely
# moves between two weak penalties, the warm start already meets `tol` and is kept: the two C's score the same.)
DEFAULT_CS: tuple[float, ...] = tuple(10.0 ** e for e in range(-4, 5))

# The sweep stops once this many C's in a row have not beaten the best validation accuracy. Validation accuracy
# against log C rises to one peak and falls (the assumption CLIP_benchmark's binary search makes too), and the
# weakly regularised fits past the peak are the slow ones (L-BFGS needs hundreds of iterations there), so this skips
# most of the sweep's cost without changing the chosen C. None sweeps the whole grid.
DEFAULT_PATIENCE = 2


def few_shot_indices(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted indices of k seeded random samples per class (all of a class's samples where it has fewer than k)."""
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(keep).sort().values


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (fit, val) index split holding out round(val_fraction * n_c) of each class, leaving at least one."""
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = min(int(val_fraction * len(idx) + 0.5), len(idx) - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def fit_softmax_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, *, max_iter: int = 1000,
                           tol: float = 1e-4, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [num_classes, D], b [num_classes]) minimising the module's objective, in x's dtype; starts from `init`
    or zeros.

    Stops when the largest gradient component is below `tol` (scipy's L-BFGS-B criterion, which sklearn uses with the
    same default tol) or after `max_iter` iterations.
    """
    n, dim = x.shape
    if init is None:
        w = torch.zeros(num_classes, dim, device=x.device, dtype=x.dtype)
        b = torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    else:
        w, b = (t.detach().clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    # scipy's history size: memory stays at 10 copies of W even for thousands of classes.
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                                  history_size=10, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * C * n)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + penalty * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> float:
    w, b = params
    return float((torch.addmm(b, x, w.T).argmax(dim=1) == y).float().mean())


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 val_fraction: float = 0.2, regs: Sequence[float] | None = None, few_shot_k: int | None = None,
                 patience: int | None = DEFAULT_PATIENCE, seed: int = 0, max_iter: int = 1000, tol: float = 1e-4,
                 device: torch.device | str | None = None, progress: bool = False) -> dict:
    """Sweep the C values `regs` (default DEFAULT_CS) from the smallest up on a stratified validation split of
    train, stopping after `patience` C's in a row without a better validation acc1; refit on all of train with the
    best one (ties: the smallest C), evaluate on test.

    With a single C there is no sweep and no validation split. `few_shot_k` first keeps k seeded random samples per
    class of train. Returns the test metrics, `best_C`, `val_acc1_per_C` and the sample counts.
    """
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    device = torch.device(device) if device is not None else train_x.device
    # float32 unless given float64: it puts the weights within ~1e-3 of the optimum, plenty for accuracy.
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    train_x, test_x = train_x.to(device, dtype), test_x.to(device, dtype)
    train_y, test_y = (torch.as_tensor(t).to(device, torch.long) for t in (train_y, test_y))
    num_classes = max(int(train_y.max()), int(test_y.max())) + 1
    if few_shot_k is not None:
        keep = few_shot_indices(train_y, few_shot_k, seed).to(device)
        train_x, train_y = train_x[keep], train_y[keep]

    # Standardised with train statistics (population std, as sklearn's StandardScaler), not L2-normalised: the L2
    # penalty and L-BFGS treat every dimension alike only when the dimensions have comparable scales, which
    # L2-normalising the rows does not give; it also makes one C grid fit backbones whose features differ in scale.
    # Constant dimensions are left unscaled.
    mean, std = train_x.mean(dim=0), train_x.std(dim=0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    cs = sorted(float(c) for c in (DEFAULT_CS if regs is None else regs))
    val_acc: dict[float, float] = {}
    best_C, best_params, val_samples = cs[0], None, 0
    if len(cs) > 1:
        fit_idx, val_idx = (i.to(device) for i in stratified_split(train_y, val_fraction, seed))
        if len(val_idx) == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves no validation samples for the C sweep; "
                             "pass a larger fraction or a single C in regs")
        val_samples = len(val_idx)
        fit_x, fit_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
        params, since_best = None, 0
        for C in progress_bar(cs, desc="linear probe: C sweep", disable=not progress):
            params = fit_softmax_regression(fit_x, fit_y, num_classes, C, max_iter=max_iter, tol=tol, init=params)
            val_acc[C] = _accuracy(val_x, val_y, params)
            if best_params is None or val_acc[C] > val_acc[best_C]:
                best_C, best_params, since_best = C, params, 0
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    break
    w, b = fit_softmax_regression(train_x, train_y, num_classes, best_C, max_iter=max_iter, tol=tol, init=best_params)
    metrics = classification_metrics(torch.addmm(b, test_x, w.T), test_y, num_classes)
    return {**metrics, "best_C": best_C, "val_acc1_per_C": val_acc, "train_samples": len(train_y),
            "val_samples": val_samples, "test_samples": len(test_y)}
