"""Grad-cache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): encode a
large batch chunk by chunk without keeping activations, compute the contrastive loss on the cached features,
then recompute each chunk in backward and push the features' gradients through it.

Memory: the activations of one chunk plus the features of the whole batch, whatever the batch size. Written as
an autograd Function over the tower's parameters, so the engine's single `backward()` drives it and DeepSpeed's
gradient hooks fire once per parameter, as usual (ZeRO 0-2; ZeRO-3's partitioned parameters cannot be handed to
a Function, so it is refused there). Each chunk's RNG state is replayed in backward, so dropout and patch
dropout draw the same masks twice. Batch-norm statistics are updated twice per step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _CachedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, encode: Callable, inputs: torch.Tensor, chunk: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.encode, ctx.chunk, ctx.params = encode, chunk, params
        ctx.save_for_backward(inputs)
        ctx.rng = []
        outputs = []
        with torch.no_grad():
            for start in range(0, inputs.shape[0], chunk):
                ctx.rng.append(_rng_state(inputs.device))
                outputs.append(encode(inputs[start:start + chunk]))
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_features: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        params = ctx.params
        totals = [None] * len(params)
        saved = _rng_state(inputs.device)
        for index, start in enumerate(range(0, inputs.shape[0], ctx.chunk)):
            _set_rng_state(ctx.rng[index], inputs.device)
            with torch.enable_grad():
                features = ctx.encode(inputs[start:start + ctx.chunk])
                grads = torch.autograd.grad(features, params, grad_features[start:start + ctx.chunk],
                                            allow_unused=True)
            totals = [g if t is None else (t if g is None else t + g) for t, g in zip(totals, grads)]
        _set_rng_state(saved, inputs.device)
        return (None, None, None, *totals)


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_encode(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, chunk: int,
                  tower: nn.Module) -> torch.Tensor:
    """encode(inputs), computed in chunks of `chunk` rows, with gradients for `tower`'s trainable parameters
    (parameters `encode` does not use get none, so passing the whole two-tower model is fine)."""
    params = [p for p in tower.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not params:
        return encode(inputs)
    return _CachedEncode.apply(encode, inputs, chunk, *params)
