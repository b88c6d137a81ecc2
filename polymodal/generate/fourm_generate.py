"""Any-to-any generation with a trained 4M (objective `4m`): each target modality is generated from the given
conditions, and chained: what one target generated conditions the next (caption -> edges -> rgb).

- Image-like targets: MaskGIT (Chang et al. 2022; keep the most confident sampled tokens, cosine schedule) or ROAR
  (4M's random-order autoregression: a random set of positions per step, linear schedule). Each step the tokens
  decoded so far join the encoder's input (as 4M does), and the decoder predicts the rest.
- Sequence targets: autoregressive from the first sentinel until the next sentinel or [EOS], with a KV cache: the
  decoder's self-attention keys and values grow a token at a time and the cross-attention's are computed once
  from the encoder output (the reference re-runs the whole decoder per token). `cache=False` re-runs it, as a
  check (equal tokens, tested).
- Sampling: temperature (constant, or linear down to 0 over the steps), top-k, top-p, classifier-free guidance
  (`cfg` > 1: logits = uncond + cfg * (cond - uncond), the unconditional pass seeing only the target's own decoded
  tokens; train with `objective.condition_dropout` so the model knows that case). Seeded by a torch.Generator.

Conditions and results are token ids: image-like `[B, h, w]`, sequences `[B, L]` with lengths `[B]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polymodal.data.errors import ConfigError
from polymodal.models.fourm import Tokens

SCHEDULES = ("maskgit", "roar")
TEMPERATURE_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Schedule:
    """How many image tokens each step decodes: `maskgit:8` (cosine) or `roar:16` (linear)."""

    kind: str = "maskgit"
    steps: int = 8

    @classmethod
    def parse(cls, text: str) -> Schedule:
        kind, _, steps = text.partition(":")
        if kind not in SCHEDULES or not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"unknown schedule {text!r}: write maskgit:STEPS or roar:STEPS (e.g. roar:16)")
        return cls(kind, int(steps))

    def counts(self, tokens: int) -> list[int]:
        """Tokens decoded at each step, summing to `tokens` (at most `tokens` steps)."""
        steps = min(self.steps, tokens)
        if self.kind == "roar":
            edges = [round(tokens * i / steps) for i in range(steps + 1)]
        else:  # MaskGIT's cosine: the share still masked after step i is cos(pi/2 * (i + 1) / steps)
            edges = [tokens - round(tokens * math.cos(math.pi / 2 * i / steps)) for i in range(steps + 1)]
        counts = [b - a for a, b in zip(edges, edges[1:])]
        # Rounding can leave a step empty; move one token into it from the largest step.
        for i, c in enumerate(counts):
            if c == 0:
                counts[counts.index(max(counts))] -= 1
                counts[i] = 1
        return counts


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    temperature_schedule: str = "constant"
    top_k: int = 0
    top_p: float = 0.0
    cfg: float = 1.0  # guidance scale; 1: none

    def __post_init__(self):
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ConfigError(f"unknown temperature schedule {self.temperature_schedule!r}; one of "
                              f"{', '.join(TEMPERATURE_SCHEDULES)}")
        if self.temperature < 0 or self.top_k < 0 or not 0 <= self.top_p <= 1 or self.cfg < 0:
            raise ConfigError("sampling: temperature >= 0, top_k >= 0, 0 <= top_p <= 1, cfg >= 0")

    def temperature_at(self, step: int, steps: int) -> float:
        if self.temperature_schedule == "linear":
            return self.temperature * (1 - step / max(steps, 1))
        return self.temperature


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits [..., V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float, sampling: Sampling, generator: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [...], their probabilities [...]) from logits [..., V]."""
    logits = filter_logits(logits.float(), sampling.top_k, sampling.top_p)
    if temperature <= 0:
        ids = logits.argmax(-1)
        return ids, logits.softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    probs = (logits / temperature).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return ids, probs.gather(-1, ids[..., None]).squeeze(-1)


class FourMGenerator:
    """Generation with a trained `4m` objective (eval mode, no gradients)."""

    def __init__(self, objective, sampling: Sampling = Sampling(), schedule: Schedule = Schedule(),
                 seed: int = 0):
        self.objective, self.model = objective, objective.model
        self.sampling, self.schedule = sampling, schedule
        device = next(self.model.parameters()).device
        self.generator = torch.Generator(device).manual_seed(seed)

    # ------------------------------------------------------------------------------------------------ inputs

    def check_names(self, conditions: dict, targets: list[str]) -> None:
        known = self.objective.specs
        for name in [*conditions, *targets]:
            if name not in known:
                raise ConfigError(f"modality {name!r}: this model was trained on {', '.join(known)}")
        for name in conditions:
            if not self.objective.modality_configs[name].input:
                raise ConfigError(f"modality {name!r} was trained as a target only; it cannot be a condition")
        for name in targets:
            if not self.objective.modality_configs[name].target:
                raise ConfigError(f"modality {name!r} was trained as an input only; it cannot be generated")

    def inputs(self, conditions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Tokens]:
        """Encoder inputs: every token of every condition ((ids [B, N], lengths [B]) each)."""
        out = {}
        for name, (ids, lengths) in conditions.items():
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            out[name] = Tokens(ids, positions, positions < lengths[:, None])
        return out

    # --------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, conditions: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                 targets: list[str], batch_size: int = 1, stop: bool = True) -> dict[
                     str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Generate `targets` in order, each conditioned on `conditions` and the targets before it. Conditions:
        image ids [B, h, w], or (ids [B, L], lengths [B]) for sequences; none at all generates `batch_size`
        samples unconditionally. Returns the generated targets alike. `stop=False` runs every sequence to its
        full length (the same number of model calls on every rank, for generation inside a ZeRO-3 run)."""
        self.check_names(conditions, targets)
        self.model.eval()
        given = {name: self.condition(name, value) for name, value in conditions.items()}
        batch = next(iter(given.values()))[0].shape[0] if given else batch_size
        out = {}
        for name in targets:
            spec = self.objective.specs[name]
            if spec.is_sequence:
                ids, lengths = self.generate_sequence(given, name, batch, stop=stop)
                out[name] = (ids, lengths)
            else:
                ids = self.generate_image(given, name, batch)
                out[name] = ids.view(-1, *spec.grid)
                lengths = torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
            given[name] = (ids, lengths)
        return out

    def condition(self, name: str, value) -> tuple[torch.Tensor, torch.Tensor]:
        """A condition as the encoder takes it: (ids [B, N], lengths [B]), sequences cut to the model's length."""
        spec = self.objective.specs[name]
        if spec.is_sequence:
            ids, lengths = value if isinstance(value, tuple) else (value, torch.full((len(value),), value.shape[1]))
            return ids.long()[:, :spec.max_length], lengths.to(ids.device).clamp_max(spec.max_length)
        if tuple(value.shape[1:]) != spec.grid:
            raise ConfigError(f"condition {name}: token grid {tuple(value.shape[1:])}, the model's is {spec.grid}")
        ids = value.long().flatten(1)
        return ids, torch.full((ids.shape[0],), ids.shape[1], device=ids.device)

    def generate_image(self, given: dict, name: str, batch: int) -> torch.Tensor:
        """MaskGIT or ROAR decoding of image-like modality `name`: ids [B, N]."""
        spec = self.objective.specs[name]
        device = next(self.model.parameters()).device
        n = spec.grid[0] * spec.grid[1]
        positions = torch.arange(n, device=device).expand(batch, -1)
        decoded = torch.zeros(batch, n, dtype=torch.long, device=device)
        done = torch.zeros(batch, n, dtype=torch.bool, device=device)
        counts = self.schedule.counts(n)
        for step, count in enumerate(counts):
            own = {name: Tokens(decoded, positions, done)}
            target = {name: Tokens(None, positions, ~done)}
            logits = self.model({**self.inputs(given), **own}, target)[name].view(batch, -1, spec.vocab_size)
            if self.sampling.cfg != 1:
                unconditional = self.model(own, target)[name].view(batch, -1, spec.vocab_size)
                logits = unconditional + self.sampling.cfg * (logits - unconditional)
            ids, confidence = sample(logits, self.sampling.temperature_at(step, len(counts)), self.sampling,
                                     self.generator)
            if self.schedule.kind == "roar":
                confidence = torch.rand(confidence.shape, device=device, generator=self.generator)
            chosen = confidence.topk(count, dim=1).indices  # among the still-masked positions, in their order
            where = (~done).nonzero()[:, 1].view(batch, -1)  # the grid index of each still-masked position
            picked = where.gather(1, chosen)
            decoded.scatter_(1, picked, ids.gather(1, chosen))
            done.scatter_(1, picked, True)
        return decoded

    def generate_sequence(self, given: dict, name: str, batch: int, cache: bool = True,
                          stop: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive decoding of sequence modality `name` after the first sentinel: (ids [B, L], ending with
        [EOS] as the token sets' sequences do; lengths [B] with it). `stop=False` decodes max_length - 1 tokens
        whatever comes (for timing)."""
        spec = self.objective.specs[name]
        device = next(self.model.parameters()).device
        sentinels = self.objective.sentinel_ids.to(device)
        eos = self.objective.config.eos_id
        guided = self.sampling.cfg != 1
        passes = [self.inputs(given)] + ([{}] if guided else [])
        states = []
        for inputs in passes:
            encoded, at = self.model.encode(inputs or self._nothing(batch, device), packed=False)
            states.append((encoded, at, self.model.decoder.new_caches()))
        tokens = torch.full((batch, 1), int(sentinels[0]), dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        out = []
        for t in range(spec.max_length - 1):
            logits = [self._next_logits(name, tokens, encoded, at, caches, cache)
                      for encoded, at, caches in states]
            scores = logits[0] if not guided else logits[1] + self.sampling.cfg * (logits[0] - logits[1])
            ids, _ = sample(scores, self.sampling.temperature_at(t, spec.max_length - 1), self.sampling,
                            self.generator)
            out.append(torch.where(finished, torch.full_like(ids, self.objective.config.pad_id), ids))
            finished |= torch.isin(ids, sentinels) | (ids == eos)
            if stop and bool(finished.all()):
                break
            tokens = torch.cat([tokens, ids[:, None]], 1)
        generated = torch.stack(out, 1)
        stop = torch.isin(generated, sentinels) | (generated == eos) | (generated == self.objective.config.pad_id)
        lengths = torch.where(stop.any(1), stop.float().argmax(1), generated.shape[1])
        # Sequences in the token sets end with [EOS]: so do generated ones, when they are conditions next.
        ended = torch.cat([generated, torch.full((batch, 1), self.objective.config.pad_id, device=device)], 1)
        ended.scatter_(1, lengths[:, None], eos)
        return ended[:, : int(lengths.max()) + 1], lengths + 1

    def _nothing(self, batch: int, device) -> dict[str, Tokens]:
        """No condition at all (the unconditional pass): one modality with nothing kept."""
        name = next(n for n, m in self.objective.modality_configs.items() if m.input)
        empty = torch.zeros(batch, 1, dtype=torch.long, device=device)
        return {name: Tokens(empty, empty, empty.bool())}

    def _next_logits(self, name, tokens, encoded, at, caches, cache: bool) -> torch.Tensor:
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(batch, -1)
        if not cache:  # re-run the decoder over the whole prefix (the reference's way)
            logits = self.model.decode(encoded, at, {name: Tokens(tokens, positions, torch.ones_like(tokens).bool())})
            return logits[name].view(batch, length, -1)[:, -1]
        x = self.model.embed_tokens(name, Tokens(tokens[:, -1:], positions[:, -1:], None)).to(encoded.dtype)
        hidden = self.model.decoder.step(x, caches, encoded, at.pad_mask)
        return self.model.heads[name](hidden[:, -1])


__all__ = ["FourMGenerator", "SCHEDULES", "Sampling", "Schedule", "filter_logits", "sample"]
