"""A re-implementation of apple/ml-4m's training mechanism, for benchmarks/fourm_step.py: it is not pip-installable,
so its approach is written out here from fourm/data/masking.py (UnifiedMasking) and fourm/models/fm.py, and run on
the parameters of our `4m` objective (the same weights, the same math).

- Masking per sample in Python, in DataLoader workers (`ReferenceMasking`, a Dataset over raw token samples): one
  Dirichlet of the mixture picked with torch.multinomial; the input budget Dir(alpha) * N floored, the remainder
  given by argmaxes of further Dirichlet draws, clamped to each modality's size; the target budget likewise from
  the tokens the input left; image masks from a noise argsort; sequences through `simple_span_masking` (a Python
  loop over the tokens) with the keep probability lowered x0.9 until the input fits, a long target cut from a
  sentinel. Every sample comes out at fixed shapes.
- The model pads every sample to fixed counts: the encoder takes the kept tokens (selected by sorting the input
  mask) padded to `input_tokens` (+ the global tokens), the decoder the targets padded to `target_tokens`, and every
  attention is written by hand, softmax(q k^T * scale + mask) v, with dense boolean masks: key padding for the
  encoder and the cross-attention, and 4M's decoder mask (each target token sees its own modality's targets, causal
  for sequences).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch.distributions import Dirichlet

from polymodal.models.fourm import Tokens


# --------------------------------------------------------------------------------------------------- masking

def simple_span_masking(sequence: list[int], sentinels: list[int], keep_prob: float) -> tuple[list[int], list[int]]:
    """4M's span masking of one sequence (a Python loop)."""
    masks = (torch.rand(len(sequence)) > keep_prob).tolist()
    given, wanted, previous, count = [], [], False, 0
    for token, masked in zip(sequence, masks):
        if masked:
            if not previous:
                given.append(sentinels[count])
                wanted.append(sentinels[count])
                count += 1
            wanted.append(token)
        else:
            given.append(token)
        previous = masked
    wanted.append(sentinels[count])
    return given, wanted


class ReferenceMasking(torch.utils.data.Dataset):
    """Raw token samples -> the reference's masked samples, one at a time (as its loader workers do)."""

    def __init__(self, samples: list[dict], objective):
        self.samples, self.objective = samples, objective
        self.names = list(objective.specs)
        self.sizes = torch.tensor([s.grid[0] * s.grid[1] if not s.is_sequence else s.max_length
                                   for s in objective.specs.values()])
        self.is_image = torch.tensor([not s.is_sequence for s in objective.specs.values()])
        eps = 1e-9
        # On the CPU whatever device the model is on: this runs in loader workers, as the reference's masking does.
        self.inputs = [Dirichlet(a.clamp_min(eps).cpu()) for a in objective.input_alphas]
        self.targets = [Dirichlet(a.clamp_min(eps).cpu()) for a in objective.target_alphas]
        self.weights = objective.mixture_weights.cpu()
        self.sentinels = objective.sentinel_ids.tolist()

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def budget(dirichlet, total: int, limit: torch.Tensor) -> torch.Tensor:
        counts = (dirichlet.sample() * total).floor().long()
        extra = total - int(counts.sum())
        if extra > 0:
            counts += torch.bincount(dirichlet.sample((extra,)).argmax(-1), minlength=len(counts))
        return counts.clamp(max=limit)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        objective = self.objective
        k = int(torch.multinomial(self.weights, 1))
        n_in = objective.input_budget if isinstance(objective.input_budget, int) else random.randint(
            *objective.input_budget)
        n_out = objective.target_budget if isinstance(objective.target_budget, int) else random.randint(
            *objective.target_budget)
        given = self.budget(self.inputs[k], n_in, self.sizes)
        wanted = self.budget(self.targets[k], n_out, torch.where(self.is_image, self.sizes - given, self.sizes))
        out = {}
        for i, name in enumerate(self.names):
            spec = objective.specs[name]
            ids = sample[name]
            if not spec.is_sequence:
                order = torch.rand(len(ids)).argsort()
                rank = torch.empty_like(order)
                rank[order] = torch.arange(len(ids))
                out[name] = (ids, rank < given[i], (rank >= given[i]) & (rank < given[i] + wanted[i]))
                continue
            sequence = ids.tolist()[:spec.max_length]
            keep = random.random()
            if given[i] == 0:
                inputs, targets = [], simple_span_masking(sequence, self.sentinels, 0.0)[1]
            else:
                inputs, targets = simple_span_masking(sequence, self.sentinels, keep)
                while len(inputs) > given[i]:
                    keep *= 0.9
                    inputs, targets = simple_span_masking(sequence, self.sentinels, keep)
            if len(targets) > wanted[i]:
                starts = [j for j, t in enumerate(targets) if t in self.sentinels]
                chosen = starts[random.randrange(max(1, len(starts) - 1))]
                if len(targets) - chosen >= wanted[i]:
                    targets = targets[chosen:chosen + int(wanted[i])]
                else:
                    targets = targets[next(j for j in starts if len(targets) - j <= wanted[i]):]
            width = 2 * spec.max_length + 2  # fixed shapes, as the reference's (max_tokens + 1) * 2
            given_ids, wanted_ids = torch.zeros(width, dtype=torch.long), torch.zeros(width, dtype=torch.long)
            given_ids[:len(inputs)] = torch.tensor(inputs, dtype=torch.long)
            wanted_ids[:len(targets)] = torch.tensor(targets, dtype=torch.long)
            out[name] = (given_ids, torch.arange(width) < len(inputs), wanted_ids, torch.arange(width) < len(targets))
        return out


def collate(samples: list[dict]) -> dict:
    return {name: tuple(torch.stack(parts) for parts in zip(*(s[name] for s in samples))) for name in samples[0]}


def as_tokens(objective, batch: dict, device=None) -> tuple[dict, dict, dict]:
    """The reference's masked batch as (inputs, targets, labels) in our objective's terms, on `device` (default:
    where the batch is; the reference's training loop moves each loader batch there)."""
    inputs, targets, labels = {}, {}, {}
    for name, parts in batch.items():
        if device is not None:
            parts = tuple(part.to(device, non_blocking=True) for part in parts)
        if objective.specs[name].is_sequence:
            given, given_keep, wanted, wanted_keep = parts
            positions = torch.arange(given.shape[1], device=given.device).expand(given.shape[0], -1)
            inputs[name] = Tokens(given, positions, given_keep)
            targets[name] = Tokens(wanted[:, :-1], positions[:, :-1], wanted_keep[:, 1:])
            labels[name] = wanted[:, 1:]
        else:
            ids, shown, predicted = parts
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            inputs[name], targets[name], labels[name] = Tokens(ids, positions, shown), Tokens(None, positions,
                                                                                                 predicted), ids
    return inputs, targets, labels


# ----------------------------------------------------------------------------------------------------- model

def fixed(x: torch.Tensor, keep: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens first (a stable sort of the mask, as 4M selects them), cut or padded to `count`."""
    order = (~keep).long().argsort(dim=1, stable=True)[:, :count]
    if order.shape[1] < count:
        order = F.pad(order, (0, count - order.shape[1]))
        valid = F.pad(keep.gather(1, order[:, :keep.shape[1]]), (0, count - keep.shape[1]), value=False)
    else:
        valid = keep.gather(1, order)
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), valid


def attention_by_hand(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def attend(attn, x, mask, context=None):
    b, n, c = x.shape
    heads = lambda t: t.view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    if context is None:
        q, k, v = attn.qkv(x).chunk(3, -1)
    else:
        q, (k, v) = attn.q(x), attn.kv(context).chunk(2, -1)
    out = attention_by_hand(attn.q_norm(heads(q)), attn.k_norm(heads(k)), heads(v), mask)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def stack(transformer, x, mask, context=None, context_mask=None):
    for block in transformer.blocks:
        x = x + attend(block.attn, block.norm1(x), mask)
        if context is not None:
            x = x + attend(block.cross_attn, block.norm_cross(x), context_mask, block.norm_context(context))
        x = x + block.mlp(block.norm2(x))
    return transformer.norm(x)


def reference_loss(objective, inputs: dict, targets: dict, labels: dict) -> torch.Tensor:
    """The same loss as our objective's, computed the reference's way (fixed padded counts, dense masks)."""
    model = objective.model
    b, device = next(iter(inputs.values())).keep.shape[0], next(iter(inputs.values())).keep.device
    in_count = objective.input_budget if isinstance(objective.input_budget, int) else objective.input_budget[1]
    out_count = objective.target_budget if isinstance(objective.target_budget, int) else objective.target_budget[1]
    parts = [model.global_tokens.expand(b, -1, -1)] + [model.embed_tokens(n, t) for n, t in inputs.items()]
    keep = torch.cat([torch.ones(b, model.num_global, dtype=torch.bool, device=device)]
                     + [t.keep for t in inputs.values()], 1)
    x, valid = fixed(torch.cat(parts, 1), keep, in_count + model.num_global)
    encoded = stack(model.encoder, x, valid[:, None, None, :])
    owner = torch.cat([torch.full(t.keep.shape, model.index[n], device=device) for n, t in targets.items()], 1)
    parts = [model.embed_tokens(n, t) for n, t in targets.items()]
    keep = torch.cat([t.keep for t in targets.values()], 1)
    y, y_valid = fixed(torch.cat(parts, 1), keep, out_count)
    owner, _ = fixed(owner[..., None], keep, out_count)
    owner = owner.squeeze(-1)
    causal = torch.tensor([s.is_sequence for s in model.modalities.values()], device=device)[owner]
    earlier = torch.ones(out_count, out_count, dtype=torch.bool, device=device).tril()
    mask = (owner[:, :, None] == owner[:, None, :]) & y_valid[:, None, :] & (~causal[:, :, None] | earlier)
    mask |= torch.eye(out_count, dtype=torch.bool, device=device)
    decoded = stack(model.decoder, y, mask[:, None], encoded, valid[:, None, None, :])
    truth, _ = fixed(torch.cat([labels[n][..., None] for n in targets], 1), keep, out_count)
    truth = truth.squeeze(-1)
    losses = []
    for name in targets:
        here = y_valid & (owner == model.index[name])
        if here.any():
            losses.append(F.cross_entropy(model.heads[name](decoded[here]).float(), truth[here]))
    return torch.stack(losses).mean()
