"""Derived modalities on real images: greyscale, Canny edges (a known edge map), palettes, metadata, and
class-painted foreground masks with their boxes."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data import derive
from polymodal.data.sources import SourceOptions, open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def as_rgb(image) -> np.ndarray:
    """A source record's image (encoded bytes, or an IDX array of greyscale pixels) as uint8 [H, W, 3]."""
    if isinstance(image, bytes):
        return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    return np.repeat(np.asarray(image)[..., None], 3, -1)


def real(data_root, source: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of a real source, uint8 [n, 3, H, W], and their labels."""
    records = list(itertools.islice(open_source(str(data_root / source), SourceOptions()).records(), n))
    rgb = np.stack([as_rgb(r["rgb"]) for r in records])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous(), torch.tensor([int(r["label"]) for r in records])


def test_grey_and_a_known_edge_map():
    square = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    square[..., 8:24, 8:24] = 255  # a white square on black: edges on its border only
    e = derive.edges(square)[0, 0].bool()
    assert e.dtype == torch.bool and e.any()
    border = torch.zeros(32, 32, dtype=torch.bool)
    border[6:26, 6:26] = True
    border[10:22, 10:22] = False
    assert not (e & ~border).any()  # nothing far from the border
    assert e[7:9, 12:20].any() and e[12:20, 7:9].any()  # the top and left sides found
    rgb = torch.tensor([[[[255]], [[0]], [[0]]]], dtype=torch.uint8)
    assert float(derive.grey(rgb)) == pytest.approx(0.299, abs=1e-3)


def test_metadata_and_edges_on_real_cifar(data_root):
    rgb, _ = real(data_root, "cifar10/test.tar.gz", 16)
    meta = derive.metadata(rgb)
    assert set(meta) == {"brightness", "contrast", "saturation", "colourfulness", "entropy", "edge_density"}
    assert all(v.shape == (16,) and torch.isfinite(v).all() for v in meta.values())
    assert 0.01 < float(meta["edge_density"].mean()) < 0.5 and 4 < float(meta["entropy"].mean()) <= 8
    flat = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)  # a grey image: no colour, no edges, no entropy
    m = derive.metadata(flat)
    assert float(m["colourfulness"].abs().max()) < 1e-4 and float(m["entropy"].max()) == 0
    assert float(m["edge_density"].max()) == 0 and float(m["contrast"].max()) < 1e-6


def test_palette_finds_the_colours_of_a_two_colour_image():
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[:, 0, :, :10] = 200  # red on 10 columns, blue on 6
    img[:, 2, :, 10:] = 150
    pal = derive.palette(img, k=2)
    assert pal.shape == (1, 2, 3) and pal.dtype == torch.uint8
    assert (pal[0, 0].int() - torch.tensor([200, 0, 0])).abs().max() <= 2  # the larger cluster first
    assert (pal[0, 1].int() - torch.tensor([0, 0, 150])).abs().max() <= 2


def test_fashion_mnist_foreground_masks_are_class_painted_with_boxes(data_root):
    rgb, labels = real(data_root, "fashion-mnist/t10k-images-idx3-ubyte.gz", 32)
    mask = derive.foreground_mask(rgb, labels)
    assert mask.shape == (32, 28, 28) and mask.dtype == torch.long
    for m, label, image in zip(mask, labels, rgb):
        assert set(m.unique().tolist()) == {0, int(label) + 1}
        lum = image[0].float()
        assert lum[m > 0].mean() > lum[m == 0].mean() + 60  # the object is the bright part
    box = derive.boxes(mask)
    for m, b in zip(mask, box):  # the tightest box around the object's pixels
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert b.tolist() == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    assert (derive.boxes(torch.zeros(1, 4, 4, dtype=torch.long)) == -1).all()
