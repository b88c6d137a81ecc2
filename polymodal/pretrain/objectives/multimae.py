"""MultiMAE (Bachmann et al. 2022) on the engine: objective `multimae`. With one modality it is MAE.

Each configured modality is read from the batch (any registered image-like modality, e.g. from shards that
`polymodal data derive` wrote, joined by key) or derived from rgb on the device inside the step (grey, Canny
edges, HOG, class-painted foreground masks; polymodal.data.derive). Per sample, a Dirichlet(alpha) draw splits
`num_visible` tokens across the modalities it has (polymodal.pretrain.objectives.masking, on the device, from the
engine's seeded generator); the encoder sees those tokens only, packed; a light decoder per target modality
predicts all its patches (polymodal.models.multimae). Losses on masked patches only: normalised-pixel MSE for rgb,
L1 on per-image standardised values for other maps, cross-entropy for class maps; each weighted and logged.

Adding a modality is a config entry: `objective.modalities.<name>: {channels, classes, patch_size, loss, ...}`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from polymodal.data import derive
from polymodal.data.errors import ConfigError
from polymodal.models.multimae import ModalitySpec, MultiMAE, patchify, timm_vit_export
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective
from polymodal.pretrain.objectives.classify import IMAGENET_MEAN, IMAGENET_STD
from polymodal.pretrain.objectives.masking import draw_budget, draw_visible
from polymodal.pretrain.objectives.multimae_pictures import draw, prediction_map, read_map, save_prediction

# kornia (the derived modalities) is imported with this module, before any run starts: imported for the first time
# inside a ZeRO-3 run, after DeepSpeed's zero.Init has patched nn.Module subclassing, kornia's generic model classes
# fail to build (AttributeError: type object 'ModelBase' has no attribute '__parameters__').
importlib.import_module("kornia")

LOSSES = ("norm_mse", "mse", "l1", "ce")
# The timm name the export is created with; model_kwargs set its size, patch, width, depth and heads.
TIMM_VIT = "vit_tiny_patch16_224"


def _derive_grey(rgb, labels, spec, **kw):
    return derive.grey(rgb)


def _derive_edges(rgb, labels, spec, **kw):
    return derive.edges(rgb, **kw).float()


def _derive_hog(rgb, labels, spec, **kw):
    return derive.hog(rgb, **kw)


def _derive_fgmask(rgb, labels, spec, **kw):
    if labels is None:
        raise ConfigError(f"config key 'objective.modalities.{spec.name}.derive': fgmask paints each image's class: "
                          "add label to data.modalities")
    return derive.foreground_mask(rgb, labels)


# How each derivable modality is made from the batch's uint8 rgb [B, 3, H, W] (and labels), on its device.
DERIVE = {"grey": _derive_grey, "edges": _derive_edges, "hog": _derive_hog, "fgmask": _derive_fgmask}


@dataclass
class ModalityConfig:
    # Where the modality comes from: derived from rgb in the step (grey, edges, hog, fgmask), or "" to read the
    # batch key `source` (default: the modality's own name; it must be in data.modalities).
    derive: str = ""
    derive_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. edges: {low, high, sigma}; hog: {cell}
    source: str = ""
    channels: int = 3
    # > 0: a class-index map (segmentation-like): class-embedding adapter, cross-entropy loss.
    classes: int = 0
    # Pixels per token side in this modality's own map (0: objective.patch_size). HOG at cell c over images with
    # patch p: patch_size p / c.
    patch_size: int = 0
    # norm_mse (per-patch normalised pixels, MAE's norm_pix_loss), mse or l1 on per-image standardised values, ce.
    # Default: norm_mse for rgb, ce for class maps, l1 otherwise.
    loss: str = ""
    weight: float = 1.0
    # Image-like maps other than rgb are standardised per image (MultiMAE does so for depth); false keeps their
    # values (uint8 maps scaled to [0, 1]), so predictions come back in the map's own units (PSNR, pictures).
    standardize: bool = True
    input: bool = True  # the encoder may see it
    target: bool = True  # a decoder reconstructs it


@dataclass
class MultiMAEConfig:
    # name -> its settings; null leaves a modality of a config file out (`objective.modalities.edges=null`).
    # Empty: rgb alone (MAE). (Not a default entry: a config's own mapping would be merged into it.)
    modalities: dict[str, Optional[ModalityConfig]] = field(default_factory=dict)
    patch_size: int = 4
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    drop_path: float = 0.0
    global_tokens: int = 1
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    # Queries of a modality start from its own visible encoder tokens (MultiMAE's use_task_queries).
    decoder_own_tokens: bool = True
    # Visible tokens per sample: a count, or [lo, hi] drawn uniformly per sample.
    num_visible: Any = 98
    # Dirichlet concentration: one value, or one per input modality (in the order of `modalities`).
    alpha: Any = 1.0
    sample_modalities_uniformly: bool = False
    # Visible tokens run packed (variable length, no padding); false pads them to the longest sample.
    packed: bool = True
    attention_backend: str = "auto"
    # Features for linear probe / kNN: the mean of the rgb tokens (mean) or the first global token (global).
    eval_pool: str = "mean"
    eval_modality: str = "rgb"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


@register("multimae")
class MultiMAEObjective(Objective):
    Config = MultiMAEConfig
    draws_images = True
    export_formats = (*Objective.export_formats, "timm")

    def __init__(self, config: MultiMAEConfig):
        super().__init__(config)
        self.modality_configs = {name: m for name, m in config.modalities.items() if m is not None}
        if not config.modalities:
            self.modality_configs = {"rgb": ModalityConfig()}
        specs = [self._spec(name, m) for name, m in self.modality_configs.items()]
        if not any(s.input for s in specs) or not any(s.target for s in specs):
            raise ConfigError("config key 'objective.modalities': needs at least one input and one target modality")
        if config.eval_modality not in self.modality_configs or not self.modality_configs[config.eval_modality].input:
            raise ConfigError(f"config key 'objective.eval_modality': {config.eval_modality!r} is not an input "
                              f"modality ({', '.join(n for n, m in self.modality_configs.items() if m.input)})")
        if config.eval_pool not in ("mean", "global"):
            raise ConfigError(f"config key 'objective.eval_pool': mean or global, got {config.eval_pool!r}")
        try:
            self.model = MultiMAE(specs, config.dim, config.depth, config.heads, config.mlp_ratio, config.qk_norm,
                                  config.drop_path, config.global_tokens, config.decoder_dim, config.decoder_depth,
                                  config.decoder_heads, config.decoder_own_tokens, config.attention_backend)
        except ValueError as exc:
            raise ConfigError(f"config key 'objective': {exc}") from None
        self.specs = {s.name: s for s in specs}
        self._check_budget_type()
        alpha = config.alpha
        if hasattr(alpha, "__len__"):  # a list (OmegaConf hands over a list)
            alpha = [float(a) for a in alpha]
            if len(alpha) != len(self.model.inputs) or min(alpha) <= 0:
                raise ConfigError(f"config key 'objective.alpha': one positive value per input modality "
                                  f"({len(self.model.inputs)}), got {alpha}")
        elif float(alpha) <= 0:
            raise ConfigError(f"config key 'objective.alpha': must be positive, got {alpha}")
        self.alpha = alpha
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1) * 255, persistent=False)

    # --------------------------------------------------------------------------------------------- configuration

    def _spec(self, name: str, m: ModalityConfig) -> ModalitySpec:
        key = f"objective.modalities.{name}"
        if m.derive and m.derive not in DERIVE:
            raise ConfigError(f"config key '{key}.derive': unknown {m.derive!r}; known: {', '.join(DERIVE)}")
        if not m.derive:
            from polymodal import modalities

            try:
                modalities.get(m.source or name)
            except ConfigError as exc:
                raise ConfigError(f"config key '{key}': {exc} (or set derive: {'|'.join(DERIVE)})") from None
        loss = m.loss or ("ce" if m.classes else "norm_mse" if name == "rgb" else "l1")
        if loss not in LOSSES:
            raise ConfigError(f"config key '{key}.loss': one of {', '.join(LOSSES)}, got {loss!r}")
        if loss == "ce" and not m.classes:
            raise ConfigError(f"config key '{key}.loss': ce is for class maps (set classes > 0)")
        if m.classes and loss != "ce":
            raise ConfigError(f"config key '{key}.loss': a class map (classes {m.classes}) trains with ce, not {loss}")
        if m.channels < 1 or m.classes < 0 or m.patch_size < 0 or m.weight < 0:
            raise ConfigError(f"config key '{key}': channels >= 1, classes >= 0, patch_size >= 0, weight >= 0")
        m.loss = loss  # the default resolved, for the pictures and prediction
        return ModalitySpec(name, m.channels, m.classes, m.patch_size or self.config.patch_size, m.input, m.target)

    def _check_budget_type(self) -> None:
        nv = self.config.num_visible
        ok = isinstance(nv, int) and nv > 0 or (
            hasattr(nv, "__len__") and len(nv) == 2 and all(isinstance(v, int) for v in nv) and 0 < nv[0] <= nv[1])
        if not ok:
            raise ConfigError(f"config key 'objective.num_visible': a positive count or [lo, hi], got {nv}")
        self.budget = int(nv) if isinstance(nv, int) else (int(nv[0]), int(nv[1]))

    @classmethod
    def partitioned_init(cls, section: dict[str, Any]) -> bool:
        return True  # every weight is initialised in its layer's constructor

    def check_run(self, cfg, zero_stage: int) -> None:
        super().check_run(cfg, zero_stage)
        size = cfg.data.image_size
        for name, m in self.modality_configs.items():
            spec = self.specs[name]
            side = self._map_size(name, (size, size))[0]
            if side % spec.patch_size or side // spec.patch_size != size // self.config.patch_size:
                raise ConfigError(f"config key 'objective.modalities.{name}.patch_size': {spec.patch_size} does not "
                                  f"tile its {side} px map into the {size // self.config.patch_size}-per-side grid "
                                  f"of data.image_size {size} at objective.patch_size {self.config.patch_size}")
            if not m.derive and (m.source or name) not in cfg.data.modalities:
                raise ConfigError(f"config key 'objective.modalities.{name}': reads batch key {m.source or name!r}; "
                                  "add it to data.modalities (or set derive)")
        if any(m.derive for m in self.modality_configs.values()) and "rgb" not in cfg.data.modalities:
            raise ConfigError("config key 'data.modalities': derived modalities are made from rgb; add it")
        total = len(self.model.inputs) * (size // self.config.patch_size) ** 2
        most = self.budget if isinstance(self.budget, int) else self.budget[1]
        if most >= total:
            raise ConfigError(f"config key 'objective.num_visible': {most} visible tokens leave nothing masked of "
                              f"the {total} tokens at data.image_size {size} (patch {self.config.patch_size}, "
                              f"{len(self.model.inputs)} input modalities)")

    # --------------------------------------------------------------------------------------------------- inputs

    def prepare(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each modality's model-ready map (`model_map`) and a presence mask [B, M] over the input modalities."""
        out, present = {}, []
        for name in self.modality_configs:
            x, have = self.raw_map(name, batch)
            out[name] = x = self.model_map(name, x)
            if self.specs[name].input:
                present.append(torch.ones(len(x), dtype=torch.bool, device=x.device) if have is None
                               else have.bool().to(x.device))
        return out, torch.stack(present, 1)

    def raw_map(self, name: str, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A modality as the data gives it (derived from the batch's rgb, or read from its key), with its presence
        mask when the batch has one."""
        m = self.modality_configs[name]
        if m.derive:
            return DERIVE[m.derive](batch.get("rgb"), batch.get("label"), self.specs[name], **m.derive_kwargs), \
                batch.get("rgb_present")
        source = m.source or name
        if source not in batch:
            raise ConfigError(f"config key 'objective.modalities.{name}': the batch has no {source!r} "
                              "(data.modalities)")
        return batch[source], batch.get(f"{source}_present")

    def model_map(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A modality's map as the model takes it: class ids int64 [B, H, W]; rgb normalised with mean/std; other
        maps [B, C, H, W] standardised per image, or (`standardize: false`) uint8 scaled to [0, 1]."""
        spec, m = self.specs[name], self.modality_configs[name]
        if spec.classes:
            x = x.long()
            return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x
        if x.dim() == 3:
            x = x[:, None]
        if x.shape[1] != spec.channels:
            raise ConfigError(f"config key 'objective.modalities.{name}.channels': the adapter takes "
                              f"{spec.channels} channels, the data has {x.shape[1]}")
        if name == "rgb" and not m.derive:
            return self.normalize(x)
        if m.standardize:
            return standardize(x)
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb.float() - self.mean) / self.std

    def draw_visible(self, present: torch.Tensor, tokens_each: int) -> torch.Tensor:
        budget = draw_budget(len(present), self.budget, present.device)
        return draw_visible(present, [tokens_each] * present.shape[1], budget, self.alpha,
                            self.config.sample_modalities_uniformly)

    # ----------------------------------------------------------------------------------------------- the step

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        maps, present = self.prepare(batch)
        visible = self.draw_visible(present, self._tokens_each(maps))
        out = self.model(self.model_inputs(maps), visible, tuple(self.model.targets), self.config.packed)
        return self.losses(maps, present, visible, out)

    def model_inputs(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The input modalities' maps on the model's device, image-like ones in its dtype (class ids stay int64)."""
        dtype, device = next(self.model.parameters()).dtype, self.mean.device
        return {n: maps[n].to(device) if self.specs[n].classes else maps[n].to(device, dtype)
                for n in self.model.inputs}

    def visible_of(self, visible: torch.Tensor, name: str) -> torch.Tensor:
        """The part of `visible` [B, N] that covers input modality `name`: a [B, N_m] view."""
        n = visible.shape[1] // len(self.model.inputs)
        i = self.model.inputs.index(name)
        return visible[:, i * n:(i + 1) * n]

    def _tokens_each(self, maps: dict[str, torch.Tensor]) -> int:
        spec = self.specs[self.model.inputs[0]]
        h, w = maps[spec.name].shape[-2:]
        return (h // spec.patch_size) * (w // spec.patch_size)

    def losses(self, maps, present, visible, out) -> dict[str, torch.Tensor]:
        metrics, total = {}, 0.0
        for name in self.model.targets:
            spec, m = self.specs[name], self.modality_configs[name]
            predicted = out["predictions"][name].float()
            per_token = token_losses(predicted, maps[name], spec, m.loss)  # [B, N_m]
            if name in self.model.inputs:
                i = self.model.inputs.index(name)
                hidden = ~self.visible_of(visible, name) & present[:, i:i + 1]
            else:  # a target that is never an input: every patch is masked
                hidden = torch.ones_like(per_token, dtype=torch.bool)
            weight = hidden.to(per_token.dtype)
            loss = (per_token * weight).sum() / weight.sum().clamp_min(1)
            metrics[f"loss_{name}"] = loss.detach()
            total = total + m.weight * loss
        for name in self.model.inputs:
            metrics[f"visible_{name}"] = self.visible_of(visible, name).sum(1).float().mean()
        return {"loss": total, **metrics}

    # ------------------------------------------------------------------------------------- evaluation, export

    def eval_encoder(self, name: str):
        from polymodal.eval.encoders import image_features_encoder

        return image_features_encoder(name, self)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of normalised rgb images: every token of `eval_modality` visible (derived from the images when
        it is a derived modality), and no other modality."""
        modality = self.config.eval_modality
        if modality != "rgb" or self.modality_configs[modality].derive:
            rgb = (images.float() * self.std + self.mean).round().clamp(0, 255).to(torch.uint8)
            images = self.model_map(modality, self.raw_map(modality, {"rgb": rgb})[0])
        inputs, visible = self.shown_alone({modality: images})
        out = self.model(inputs, visible, (), True)
        encoded, packing = out["encoded"], out["visible"].packing
        starts = packing.cu_seqlens[:-1].long()
        if self.config.eval_pool == "global":
            return encoded[starts]
        per_sample = encoded.unflatten(0, (len(images), -1))  # every sample keeps the same count
        return per_sample[:, self.config.global_tokens:].mean(1)

    def shown_alone(self, maps: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs in which the given model-ready `maps` are wholly visible and every other input modality is
        zeros with no visible token: (inputs, visible)."""
        first = next(iter(maps.values()))
        batch, size = len(first), first.shape[-2:]
        full = dict(maps)
        for name in self.model.inputs:
            if name not in maps:
                spec = self.specs[name]
                channels = [] if spec.classes else [spec.channels]
                full[name] = torch.zeros(batch, *channels, *self._map_size(name, size), device=self.mean.device,
                                         dtype=torch.long if spec.classes else torch.float32)
        inputs = self.model_inputs(full)
        visible = torch.zeros(batch, self._tokens_each(inputs) * len(self.model.inputs), dtype=torch.bool,
                              device=self.mean.device)
        for name in maps:
            self.visible_of(visible, name)[:] = True
        return inputs, visible

    def _map_size(self, name: str, size) -> tuple[int, int]:
        """The size of modality `name`'s map for images of `size` (HOG has a cell per pixel of its map)."""
        m = self.modality_configs[name]
        cell = m.derive_kwargs.get("cell", 8) if m.derive == "hog" else 1  # 8: derive.hog's default
        return size[0] // cell, size[1] // cell

    def timm_export(self, image_size: int | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        import json

        if not image_size:
            raise ConfigError("--format timm: the checkpoint does not record its image size (data.image_size)")
        modality = self.config.eval_modality
        if self.config.global_tokens != 1:
            raise ConfigError("config key 'objective.global_tokens': the timm export maps the one global token to "
                              f"timm's class token; this model has {self.config.global_tokens}")
        patch = self.specs[modality].patch_size
        grid = (image_size // patch, image_size // patch)
        state = timm_vit_export(self.model, modality, grid)
        kwargs = {"img_size": image_size, "patch_size": patch, "embed_dim": self.config.dim,
                  "depth": self.config.depth, "num_heads": self.config.heads, "mlp_ratio": self.config.mlp_ratio,
                  "qk_norm": self.config.qk_norm, "global_pool": "avg" if self.config.eval_pool == "mean" else "token",
                  "fc_norm": False}
        preprocess = {"mean": list(self.config.mean), "std": list(self.config.std), "image_size": image_size}
        return state, {"timm.model": TIMM_VIT, "timm.model_kwargs": json.dumps(kwargs),
                       "timm.preprocess": json.dumps(preprocess)}

    # ------------------------------------------------------------------------------------ cross-modal prediction

    @torch.no_grad()
    def predict(self, given: dict[str, torch.Tensor], targets: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Fill `targets` from the `given` modalities, every token of which is visible. `given` holds batches as the
        data pipeline gives them (uint8 rgb [B, 3, H, W], maps [B, C, H, W], class maps [B, H, W]), keyed by the
        objective's modality names. Returns each target as a map: class ids [B, H, W] for class maps; else values in
        the space the model trained them in (normalised rgb, standardised or raw maps; per-patch normalised for
        norm_mse targets, which have no absolute level to return)."""
        unknown = [n for n in given if n not in self.model.inputs]
        if unknown:
            raise ConfigError(f"given modality {unknown[0]!r} is not an input of this model "
                              f"(inputs: {', '.join(self.model.inputs)})")
        wrong = [t for t in targets if t not in self.model.targets]
        if wrong or not targets:
            raise ConfigError(f"target {wrong[0] if wrong else '(none)'!r}: this model decodes "
                              f"{', '.join(self.model.targets)}")
        maps = {name: self.model_map(name, x.to(self.mean.device)) for name, x in given.items()}
        inputs, visible = self.shown_alone(maps)
        size = next(iter(maps.values())).shape[-2:]
        out = self.model(inputs, visible, tuple(targets), self.config.packed)
        return {t: prediction_map(self, t, out["predictions"][t], self._map_size(t, size), None) for t in targets}

    def predict_files(self, given: dict[str, Path], targets: list[str], out: Path, image_size: int | None) -> Path:
        tensors = {name: read_map(path, self.specs.get(name), name, image_size) for name, path in given.items()}
        predicted = self.predict(tensors, targets)
        return save_prediction(self, tensors, predicted, out)

    # ---------------------------------------------------------------------------------------------- pictures

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], path: str | Path | None, max_images: int = 8,
                   seed: int = 0) -> Path | None:
        """A PNG with one row per image and, for each modality: its input, the masked input (hidden patches
        grey) and the prediction with the visible patches pasted back."""
        small = {k: (v[:max_images] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        maps, present = self.prepare(small)
        with torch.random.fork_rng(devices=[present.device] if present.is_cuda else []):
            torch.manual_seed(seed)  # the same masks every time, and the training RNG untouched
            visible = self.draw_visible(present, self._tokens_each(maps))
        was_training = self.training
        self.eval()
        try:
            out = self.model(self.model_inputs(maps), visible, tuple(self.model.targets), self.config.packed)
        finally:
            self.train(was_training)
        if path is None:
            return None
        return draw(self, maps, visible, out, Path(path))


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per image: zero mean, unit standard deviation over all its values (a flat map stays 0)."""
    x = x.float()
    flat = x.flatten(1)
    mean, std = flat.mean(1), flat.std(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / (std.view(shape) + 1e-6)


def token_losses(predicted: torch.Tensor, target: torch.Tensor, spec: ModalitySpec, loss: str) -> torch.Tensor:
    """The loss of each token's patch, [B, N]."""
    p = spec.patch_size
    if loss == "ce":
        labels = patchify(target[:, None].float(), p).long()  # [B, N, p*p]
        logits = predicted.unflatten(-1, (p * p, spec.classes))  # [B, N, p*p, classes]
        return F.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none").view(labels.shape).mean(-1)
    target = patchify(target.float(), p)
    if loss == "norm_mse":
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    if loss == "l1":
        return (predicted - target).abs().mean(-1)
    return (predicted - target).square().mean(-1)


__all__ = ["DERIVE", "ModalityConfig", "MultiMAEConfig", "MultiMAEObjective", "standardize", "token_losses"]
