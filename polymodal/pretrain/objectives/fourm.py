"""4M (Mizrahi et al. 2023; 4M-21) on the engine: objective `4m`, masked any-to-any modelling of token modalities.

Every modality is a token set that `polymodal data tokenize` wrote (`tok_rgb`, `tok_edges`, `tok_caption`...),
joined by key. Per sample, on the device and vectorised over the batch (polymodal.pretrain.objectives.masking and
span_masking, from the engine's seeded generator, so resume is exact; nothing in loader workers):

- one component of a mixture of Dirichlets is picked; its input alphas split `input_tokens` across the modalities
  the sample has, its target alphas split `target_tokens` (exactly, by the largest remainder; as in 4M, a
  modality's count is then capped at what it holds, and the rest is not handed to the others);
- an image-like modality shows its input count of tokens, drawn at random, and predicts its target count from
  the rest, so its inputs and targets never overlap;
- a sequence is span-masked T5-style with sentinels: the input is the kept tokens with one sentinel per masked
  run, the target the runs after their sentinels; it is fitted to its input and target counts as 4M fits it.

The model (polymodal.models.fourm) encodes the inputs and decodes the targets; no sample is padded to a fixed
token count: packed (variable-length sequences on the varlen kernels) on CUDA, padded to the batch's longest sample
with dense masks on CPU (see `packed`). Loss: cross-entropy per target modality, image tokens predicted in parallel
and sequences next-token; averaged per modality (4M's default, `loss_type: modality`) or over all target tokens
(`token`). Each modality's loss and accuracy are logged as `loss_<name>` and `acc_<name>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from polymodal.data.errors import ConfigError
from polymodal.models.fourm import FourM, FourMModality, Tokens
from polymodal.pretrain.export import polymodal_format, register_export
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective
from polymodal.pretrain.objectives.masking import (dirichlet_shares, draw_budget, mixture_shares, random_ranks,
                                                   split_budget)
from polymodal.pretrain.objectives.span_masking import KEEP_SCHEMES, keep_probability, span_mask
from polymodal.tokenizers.text import SPECIALS

LOSS_TYPES = ("modality", "token")


@dataclass
class FourMModalityConfig:
    vocab_size: int = 0
    # Image-like: the token grid [rows, cols]. Empty: a sequence, of at most `max_length` tokens (longer ones are
    # cut, as 4M cuts them).
    grid: list[int] = field(default_factory=list)
    max_length: int = 0
    # The tokenizer that made the token set (a run folder or vocabulary): its fingerprint must match the set's.
    tokenizer: str = ""
    input: bool = True  # the encoder may see it
    target: bool = True  # the decoder may predict it


@dataclass
class MixtureComponent:
    weight: float = 1.0
    # One alpha for every modality, or {modality: alpha} (modalities left out get 0: never chosen).
    input_alpha: Any = 0.5
    target_alpha: Any = 0.5
    keep: str = "random"  # how much of a sequence stays input: random (U(0, 1)), all, or binary


@dataclass
class FourMConfig:
    # name (the batch key, e.g. tok_rgb) -> its settings; null leaves a modality of a config file out.
    modalities: dict[str, Optional[FourMModalityConfig]] = field(default_factory=dict)
    # Input and target tokens per sample: a count, or [lo, hi] drawn uniformly per sample.
    input_tokens: Any = 32
    target_tokens: Any = 32
    # Empty: one component, all2all with alpha 0.5 for inputs and targets.
    mixture: list[MixtureComponent] = field(default_factory=list)
    dim: int = 256
    encoder_depth: int = 4
    decoder_depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    global_tokens: int = 1
    loss_type: str = "modality"
    # The share of samples trained with every input dropped (only the global tokens): the unconditional model that
    # classifier-free guidance subtracts at generation.
    condition_dropout: float = 0.0
    # true: encoder and decoder run packed (variable-length sequences: one per sample in the encoder, one per
    # (sample, target modality) in the decoder's self-attention); false: every sample padded to the batch's longest,
    # with dense masks (4M's way, without its fixed counts). Unset: packed on CUDA (the varlen kernels), padded on
    # CPU, which has no varlen kernel, so packed sequences are padded anyway, one per (sample, modality): the tiny
    # CIFAR config's step ran 21% faster padded in bf16, 5% in fp32 (measured, batch 64).
    packed: Optional[bool] = None
    attention_backend: str = "auto"
    # `polymodal eval` features: images through this image-token modality's tokenizer, all their tokens given to the
    # encoder, the mean of its outputs at them.
    eval_modality: str = "tok_rgb"
    # Sequence vocabularies: polymodal's WordPiece layout ([PAD], [UNK], [EOS], then the sentinels [S_0]...).
    pad_id: int = 0
    eos_id: int = SPECIALS.index("[EOS]")
    first_sentinel: int = len(SPECIALS)
    sentinels: int = 0  # 0: just enough for the longest sequence (max_length // 2 + 2)


@register("4m")
class FourMObjective(Objective):
    Config = FourMConfig
    draws_images = True
    # standalone: the polymodal export with every modality's tokenizer inside (polymodal/tokenizers/bundle.py).
    export_formats = (*Objective.export_formats, "standalone")

    def __init__(self, config: FourMConfig):
        super().__init__(config)
        self.modality_configs = {name: m for name, m in config.modalities.items() if m is not None}
        if not self.modality_configs:
            raise ConfigError("config key 'objective.modalities': name at least one token modality (e.g. tok_rgb: "
                              "{vocab_size: 1000, grid: [8, 8]})")
        specs = [self._spec(name, m) for name, m in self.modality_configs.items()]
        if not any(m.input for m in self.modality_configs.values()) or not any(
                m.target for m in self.modality_configs.values()):
            raise ConfigError("config key 'objective.modalities': needs at least one input and one target modality")
        if not 0 <= config.condition_dropout < 1:
            raise ConfigError(f"config key 'objective.condition_dropout': a share in [0, 1), got "
                              f"{config.condition_dropout}")
        if config.loss_type not in LOSS_TYPES:
            raise ConfigError(f"config key 'objective.loss_type': one of {', '.join(LOSS_TYPES)}, got "
                              f"{config.loss_type!r}")
        self.input_budget = _budget(config.input_tokens, "input_tokens")
        self.target_budget = _budget(config.target_tokens, "target_tokens")
        longest = max((s.max_length for s in specs if s.is_sequence), default=0)
        self.num_sentinels = config.sentinels or (longest // 2 + 2)
        if longest and self.num_sentinels < (longest + 1) // 2 + 1:
            raise ConfigError(f"config key 'objective.sentinels': sequences of {longest} tokens need "
                              f"{(longest + 1) // 2 + 1} sentinels, got {self.num_sentinels}")
        try:
            self.model = FourM(specs, config.dim, config.encoder_depth, config.decoder_depth, config.heads,
                               config.mlp_ratio, config.qk_norm, config.global_tokens, config.attention_backend)
        except ValueError as exc:
            raise ConfigError(f"config key 'objective': {exc}") from None
        self.specs = {s.name: s for s in specs}
        weights, inputs, targets, keeps = self._mixture()
        self.register_buffer("mixture_weights", weights, persistent=False)
        self.register_buffer("input_alphas", inputs, persistent=False)
        self.register_buffer("target_alphas", targets, persistent=False)
        self.keep_schemes = keeps
        self.register_buffer("sentinel_ids", torch.arange(self.num_sentinels) + config.first_sentinel,
                             persistent=False)

    # --------------------------------------------------------------------------------------------- configuration

    def _spec(self, name: str, m: FourMModalityConfig) -> FourMModality:
        key = f"objective.modalities.{name}"
        if m.vocab_size < 1:
            raise ConfigError(f"config key '{key}.vocab_size': the token set's vocabulary size (its stats.json "
                              "says it), got {m.vocab_size}")
        if m.grid:
            if len(m.grid) != 2 or min(m.grid) < 1:
                raise ConfigError(f"config key '{key}.grid': [rows, cols] of the token grid, got {list(m.grid)}")
            return FourMModality(name, m.vocab_size, (int(m.grid[0]), int(m.grid[1])))
        if m.max_length < 2:
            raise ConfigError(f"config key '{key}': a sequence needs max_length >= 2 (or set grid for image "
                              "tokens)")
        return FourMModality(name, m.vocab_size, None, m.max_length)

    def _mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        components = self.config.mixture or [MixtureComponent()]
        names = list(self.modality_configs)
        weights, inputs, targets, keeps = [], [], [], []
        for i, c in enumerate(components):
            key = f"objective.mixture[{i}]"
            if c.weight <= 0:
                raise ConfigError(f"config key '{key}.weight': must be positive, got {c.weight}")
            if c.keep not in KEEP_SCHEMES:
                raise ConfigError(f"config key '{key}.keep': one of {', '.join(KEEP_SCHEMES)}, got {c.keep!r}")
            row_in = _alphas(c.input_alpha, names, f"{key}.input_alpha")
            row_out = _alphas(c.target_alpha, names, f"{key}.target_alpha")
            row_in = [a if self.modality_configs[n].input else 0.0 for a, n in zip(row_in, names)]
            row_out = [a if self.modality_configs[n].target else 0.0 for a, n in zip(row_out, names)]
            if not any(row_in) or not any(row_out):
                raise ConfigError(f"config key '{key}': gives no modality an input or no modality a target")
            weights.append(float(c.weight))
            inputs.append(row_in)
            targets.append(row_out)
            keeps.append(c.keep)
        return torch.tensor(weights), torch.tensor(inputs), torch.tensor(targets), keeps

    @classmethod
    def partitioned_init(cls, section: dict[str, Any]) -> bool:
        return True  # every weight is initialised in its layer's constructor

    def check_run(self, cfg, zero_stage: int) -> None:
        """Every modality is a token set the data reads, with the vocabulary and grid this model was built for,
        made by the configured tokenizer (fingerprints match)."""
        super().check_run(cfg, zero_stage)
        from polymodal.data.token_data import data_token_specs

        specs = data_token_specs(cfg.data.shards, cfg.data.join)
        wanted = set(cfg.data.modalities) | set(cfg.data.optional_modalities)
        for name, spec in self.specs.items():
            key = f"objective.modalities.{name}"
            if name not in wanted:
                raise ConfigError(f"config key 'data.modalities': add {name} (objective 4m trains on it)")
            found = specs.get(name)
            if found is None:
                raise ConfigError(f"config key '{key}': no token set {name!r} in data.shards or data.join (a folder "
                                  f"that `polymodal data tokenize` wrote, e.g. OUT/{name})")
            if found.vocab_size != spec.vocab_size:
                raise ConfigError(f"config key '{key}.vocab_size': the token set holds ids of a {found.vocab_size}-"
                                  f"token vocabulary, not {spec.vocab_size}")
            if found.grid != spec.grid:
                raise ConfigError(f"config key '{key}.grid': the token set's grid is "
                                  f"{list(found.grid) if found.grid else 'none (a sequence)'}, not "
                                  f"{list(spec.grid) if spec.grid else 'none (a sequence)'}")
            self._check_tokenizer(name, found.fingerprint)

    def _check_tokenizer(self, name: str, fingerprint: str) -> None:
        path = self.modality_configs[name].tokenizer
        if not path:
            return
        from polymodal.tokenizers.registry import load

        tokenizer = load(path)
        key = f"objective.modalities.{name}.tokenizer"
        if tokenizer.fingerprint != fingerprint:
            raise ConfigError(f"config key '{key}': the token set {name!r} was made by another tokenizer (its "
                              f"fingerprint {fingerprint!r}, {path}'s {tokenizer.fingerprint!r}); tokenize the data "
                              f"again with {path}, or name the tokenizer that made it")
        if self.specs[name].is_sequence and hasattr(tokenizer, "sentinel"):
            have = tokenizer.settings.get("sentinels", 0)
            if have < self.num_sentinels or tokenizer.sentinel(0) != self.config.first_sentinel:
                raise ConfigError(f"config key '{key}': {path} has {have} sentinels from id "
                                  f"{tokenizer.sentinel(0) if have else '-'}; the objective needs "
                                  f"{self.num_sentinels} from id {self.config.first_sentinel} (objective.sentinels, "
                                  "objective.first_sentinel)")

    # ---------------------------------------------------------------------------------------------- the batch

    def read_batch(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """name -> (ids int64 [B, N], lengths [B] (0 where absent), present bool [B]) for every modality."""
        out = {}
        for name, spec in self.specs.items():
            if name not in batch:
                raise ConfigError(f"objective 4m: the batch has no {name!r}; add it to data.modalities (and its "
                                  "token set to data.join)")
            ids = batch[name].long()
            b = ids.shape[0]
            present = batch.get(f"{name}_present")
            present = torch.ones(b, dtype=torch.bool, device=ids.device) if present is None else present.bool()
            if spec.is_sequence:
                if ids.dim() != 2:
                    raise ValueError(f"{name}: expected token sequences [B, L], got shape {tuple(ids.shape)}")
                lengths = batch.get(f"{name}_lengths")
                lengths = torch.full((b,), ids.shape[1], device=ids.device) if lengths is None else lengths
                ids = ids[:, :spec.max_length]
                lengths = lengths.to(ids.device).clamp_max(spec.max_length)
            else:
                if tuple(ids.shape[1:]) != spec.grid:
                    raise ValueError(f"{name}: token grids of {tuple(ids.shape[1:])}, but the model was built for "
                                     f"{spec.grid} (objective.modalities.{name}.grid)")
                ids = ids.flatten(1)
                lengths = torch.full((b,), ids.shape[1], device=ids.device)
            out[name] = (ids, torch.where(present, lengths, 0), present)
        return out

    def draw_masks(self, read: dict) -> tuple[dict[str, Tokens], dict[str, Tokens], dict[str, torch.Tensor]]:
        """(encoder inputs, decoder targets, labels per target modality [B, N_m]) for a batch `read_batch` read."""
        names = list(self.specs)
        ids0 = read[names[0]][0]
        b, device = ids0.shape[0], ids0.device
        present = torch.stack([read[n][2] for n in names], 1)
        lengths = torch.stack([read[n][1] for n in names], 1)
        is_sequence = torch.tensor([self.specs[n].is_sequence for n in names], device=device)
        shares_in, picks = mixture_shares(present, self.input_alphas, self.mixture_weights)
        counts_in = split_budget(shares_in, lengths, draw_budget(b, self.input_budget, device), spill=False)
        # Image targets come from the tokens not shown; a sequence's target can be its whole span-masked form.
        capacity_out = torch.where(is_sequence, (lengths + 2) * present, lengths - counts_in)
        shares_out = dirichlet_shares(present, self.target_alphas[picks])
        counts_out = split_budget(shares_out, capacity_out, draw_budget(b, self.target_budget, device),
                                  spill=False)
        keep = self._keep_probabilities(picks, device)
        inputs, targets, labels = {}, {}, {}
        for i, name in enumerate(names):
            ids = read[name][0]
            if self.specs[name].is_sequence:
                given, wanted = span_mask(ids, lengths[:, i], counts_in[:, i], counts_out[:, i], self.sentinel_ids,
                                          keep, self.config.pad_id)
                inputs[name] = Tokens(given.ids, _arange_like(given.ids), given.valid())
                decoder_ids = wanted.ids[:, :-1]  # teacher forcing: each target token predicts the next
                targets[name] = Tokens(decoder_ids, _arange_like(decoder_ids),
                                       _arange_like(decoder_ids) < (wanted.lengths - 1)[:, None])
                labels[name] = wanted.ids[:, 1:]
            else:
                rank = random_ranks(b, ids.shape[1], device)
                shown = rank < counts_in[:, i:i + 1]
                positions = _arange_like(ids)
                inputs[name] = Tokens(ids, positions, shown)
                targets[name] = Tokens(None, positions, ~shown & (rank < (counts_in + counts_out)[:, i:i + 1]))
                labels[name] = ids
        return inputs, targets, labels

    def _keep_probabilities(self, picks: torch.Tensor, device) -> torch.Tensor:
        """Each sample's sequence keep probability, by the keep scheme of its mixture component."""
        schemes = sorted(set(self.keep_schemes))
        if len(schemes) == 1:
            return keep_probability(len(picks), schemes[0], device)
        drawn = torch.stack([keep_probability(len(picks), s, device) for s in schemes], 1)
        which = torch.tensor([schemes.index(s) for s in self.keep_schemes], device=device)[picks]
        return drawn.gather(1, which[:, None]).squeeze(1)

    # ---------------------------------------------------------------------------------------------- training

    @property
    def packed(self) -> bool:
        """The layout this step runs in: `config.packed`, or when unset packed on CUDA and padded on CPU."""
        packed = self.config.packed
        return self.sentinel_ids.device.type == "cuda" if packed is None else packed

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs, targets, labels = self.draw_masks(self.read_batch(batch))
        inputs = {n: t for n, t in inputs.items() if self.modality_configs[n].input}
        if self.training and self.config.condition_dropout > 0:
            dropped = torch.rand(len(labels[next(iter(labels))]), device=self.sentinel_ids.device)
            dropped = dropped < self.config.condition_dropout
            for tokens in inputs.values():
                tokens.keep = tokens.keep & ~dropped[:, None]
        targets = {n: t for n, t in targets.items() if self.modality_configs[n].target}
        logits = self.model(inputs, targets, self.packed)
        out: dict[str, torch.Tensor] = {}
        per_modality, total, count = [], 0.0, 0
        for name, lg in logits.items():
            truth = labels[name][targets[name].keep]
            if truth.numel() == 0:
                continue
            lg = lg.float()  # the loss in float32; argmax of bf16 on CPU is 4x slower than of float32 (measured)
            loss = F.cross_entropy(lg, truth, reduction="sum")
            per_modality.append(loss / truth.numel())
            total, count = total + loss, count + truth.numel()
            out[f"loss_{name}"] = (loss / truth.numel()).detach()
            out[f"acc_{name}"] = (lg.detach().argmax(-1) == truth).float().mean()
        if not per_modality:  # no target token in the whole batch: keep every parameter in the graph
            out["loss"] = sum(lg.sum() for lg in logits.values()) * 0.0
        elif self.config.loss_type == "modality":
            out["loss"] = torch.stack(per_modality).mean()
        else:
            out["loss"] = total / count
        shown = sum(t.keep.sum() for t in inputs.values())
        predicted = sum(t.keep.sum() for t in targets.values())
        self._tokens = (shown + predicted).detach()  # for the engine's tokens/s, read when it logs
        batch_size = next(iter(inputs.values())).keep.shape[0]
        out["input_tokens"] = (shown / batch_size).detach().float()
        out["target_tokens"] = (predicted / batch_size).detach().float()
        return out

    def tokens_in(self, batch: dict[str, Any]) -> int | None:
        tokens = getattr(self, "_tokens", None)
        return None if tokens is None else int(tokens)

    def log_images(self, batch: dict[str, Any], path: str | Path | None, max_images: int = 6) -> Path | None:
        """For the first samples: each image-like modality (that names its tokenizer) as its tokens decode, beside
        its greedy generation (MaskGIT, 8 steps) from every other input modality; each sequence generated the same
        way, in PATH.json beside the PNG with the true one."""
        from polymodal.generate.fourm_files import decode_images, decode_texts, write_grid
        from polymodal.generate.fourm_generate import FourMGenerator, Sampling, Schedule

        read = self.read_batch({k: (v[:max_images] if isinstance(v, (torch.Tensor, list)) else v)
                                for k, v in batch.items()})
        given = {n: (ids, lengths) if self.specs[n].is_sequence else ids.view(-1, *self.specs[n].grid)
                 for n, (ids, lengths, _) in read.items()}
        generator = FourMGenerator(self, Sampling(temperature=0), Schedule("maskgit", 8))
        was_training = self.training
        columns, texts = [], {}
        try:
            for name, spec in self.specs.items():
                others = {n: v for n, v in given.items() if n != name and self.modality_configs[n].input}
                if not others or not self.modality_configs[name].target or (
                        not spec.is_sequence and not self.modality_configs[name].tokenizer):
                    continue
                made = generator.generate(others, [name], stop=False)[name]  # stop=False: equal work on every rank
                if path is None:
                    continue
                if spec.is_sequence:
                    decode = (lambda ids, lengths: decode_texts(self, name, ids, lengths)) if self.modality_configs[
                        name].tokenizer else (lambda ids, lengths: [r[:n].tolist() for r, n in zip(ids, lengths)])
                    texts[name] = {"generated": decode(*made), "true": decode(*given[name])}
                else:
                    columns += [decode_images(self, name, given[name]), decode_images(self, name, made)]
        finally:
            self.train(was_training)
        if path is None:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(texts, indent=1))
        if not columns:
            return None
        return write_grid([list(row) for row in zip(*columns)], path)

    # ---------------------------------------------------------------------------------------------- features

    def eval_encoder(self, name: str):
        """Pixels -> the eval modality's tokenizer -> every token into the encoder -> the mean of its outputs at
        them. The tokenizers take images in [-1, 1]: mean and std 0.5."""
        from polymodal.eval.encoders import image_features_encoder

        _, size = self._eval_tokenizer()
        return image_features_encoder(name, self, [0.5] * 3, [0.5] * 3, size or 224)

    def _eval_tokenizer(self):
        modality = self.config.eval_modality
        config = self.modality_configs.get(modality)
        if config is None or self.specs[modality].is_sequence or not config.tokenizer:
            raise ConfigError(f"config key 'objective.eval_modality': {modality!r} must be an image-token modality "
                              "whose tokenizer the config names (objective.modalities.<name>.tokenizer)")
        if "_eval_tokenizer_cache" not in self.__dict__:  # not a submodule: kept out of the state dict
            from polymodal.tokenizers.registry import load_image_tokenizer

            tokenizer_objective, size = load_image_tokenizer(config.tokenizer)
            self.__dict__["_eval_tokenizer_cache"] = (tokenizer_objective.tokenizer_model.eval(), size)
        return self.__dict__["_eval_tokenizer_cache"]

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        tokenizer, _ = self._eval_tokenizer()
        tokenizer.to(images.device)
        ids = tokenizer.encode(images.to(next(tokenizer.parameters()).dtype)).flatten(1)
        positions = torch.arange(ids.shape[1], device=ids.device).expand(len(ids), -1)
        encoded, at = self.model.encode({self.config.eval_modality: Tokens(ids, positions, torch.ones_like(
            ids, dtype=torch.bool))}, packed=False)
        return encoded[:, self.config.global_tokens:].float().mean(1)


@register_export("standalone", "standalone.safetensors")
def standalone_format(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The polymodal export plus the tokenizers the run was trained with, so that `polymodal eval`, `embed` and
    `generate` need nothing but this file."""
    from polymodal.tokenizers.bundle import bundle

    tensors, metadata = polymodal_format(path)
    modalities = json.loads(metadata["polymodal.objective"]).get("modalities") or {}
    carried, carried_metadata = bundle({name: m["tokenizer"] for name, m in modalities.items()
                                        if m and m.get("tokenizer")})
    return {**tensors, **carried}, {**metadata, **carried_metadata}


# ------------------------------------------------------------------------------------------------- helpers

def _budget(value: Any, key: str) -> int | tuple[int, int]:
    ok = isinstance(value, int) and value > 0 or (
        hasattr(value, "__len__") and len(value) == 2 and all(isinstance(v, int) for v in value)
        and 0 < value[0] <= value[1])
    if not ok:
        raise ConfigError(f"config key 'objective.{key}': a positive count or [lo, hi], got {value}")
    return int(value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _alphas(value: Any, names: list[str], key: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * len(names)
    elif hasattr(value, "items"):
        unknown = set(value) - set(names)
        if unknown:
            raise ConfigError(f"config key '{key}': {', '.join(sorted(unknown))} is not a modality of "
                              f"objective.modalities ({', '.join(names)})")
        values = [float(value.get(n, 0.0)) for n in names]
    else:
        raise ConfigError(f"config key '{key}': one alpha, or {{modality: alpha}}, got {value!r}")
    if min(values) < 0:
        raise ConfigError(f"config key '{key}': alphas must be >= 0, got {values}")
    return values


def _arange_like(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
