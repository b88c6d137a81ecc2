"""Model FLOPs per sample (counted by torch) and the device's peak, for FLOP/s and MFU."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from polymodal.distributed import local_only

# Dense peak FLOP/s of one device by precision (vendor datasheets; fp32 means TF32 tensor cores on GPUs).
# Matched against torch.cuda.get_device_name(); set `peak_flops` in the config for anything else.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():  # ordered so 'H100 PCIe' is tried before 'H100'
        if key in name:
            return peaks[precision]
    return None


def slice_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def training_flops_per_sample(objective: torch.nn.Module, batch: dict[str, Any], samples: int = 2,
                              collective: bool = False) -> float:
    """3x the forward FLOPs per sample (forward + backward, the usual MFU convention; recomputation under
    activation checkpointing is not counted). Runs in eval mode with the RNG untouched, so that counting
    changes neither batch-norm statistics nor the training trajectory, and as a world of one (`local_only`): one
    rank counts its own slice on the CPU before the engine exists, and a collective there would wait for ranks
    that are not calling it, or hand NCCL CPU tensors. `collective=True` is for a model partitioned under
    ZeRO-3: every rank calls it at once, inside the engine, and its layers gather their weights."""
    import contextlib

    part = slice_batch(batch, samples)
    n = len(part["__key__"]) if "__key__" in part else samples
    was_training = objective.training
    objective.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), \
                (contextlib.nullcontext() if collective else local_only()), FlopCounterMode(display=False) as counter:
            objective(part)
    finally:
        objective.train(was_training)
    return 3.0 * counter.get_total_flops() / max(n, 1)
