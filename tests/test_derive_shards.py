"""`polymodal data derive` on real shards (CIFAR-10, Fashion-MNIST): every derived set mirrors its source's shard
names and keys and decodes through the registry; a job killed with SIGKILL and resumed writes the bytes of an
uninterrupted run; HOG and colour-cluster maps behave as they should; boxes, palettes and metadata round-trip."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import polymodal_cmd, subprocess_env
from polymodal import modalities
from polymodal.data import derive
from polymodal.data.derive_shards import (DERIVED, DeriveJob, DeriveOptions, box_text, find_classnames,
                                          parse_box)
from polymodal.data.errors import ConfigError
from polymodal.data.shard_map import map_shards, sample_rng
from polymodal.data.sources import SourceOptions, open_source
from polymodal.data.writer import WriterOptions, write_shards
from polymodal.tokenizers.text import parse_metadata, parse_palette

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR_SHARDS, CIFAR_PER_SHARD = 6, 100
ALL = ",".join(DERIVED)
OPTIONS = dict(effnet_size=64)  # EfficientNet-Lite0 at 64 px: a 4x4 feature map, cheap enough for a CPU test
CLI_OPTIONS = ["--effnet-size", "64"]


def members(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a shard, in file order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def images(shard: Path) -> tuple[list[str], torch.Tensor, list[int]]:
    """Keys, uint8 [N, 3, H, W] images and labels of a source shard."""
    keys, rgb, labels = [], [], []
    for key, m in members(shard).items():
        ext = modalities.get("rgb").find(m)
        keys.append(key)
        rgb.append(modalities.rgb_tensor(modalities.open_rgb(m[ext])))
        labels.append(int(m["cls"]))
    return keys, torch.stack(rgb), labels


@pytest.fixture(scope="module")
def cifar(tmp_path_factory, data_root) -> Path:
    """600 CIFAR-10 test images (seeded shuffle) as 6 shards of 100."""
    out = tmp_path_factory.mktemp("cifar_src")
    source = open_source(str(data_root / "cifar10" / "test.tar.gz"),
                         SourceOptions(shuffle=True, limit=CIFAR_SHARDS * CIFAR_PER_SHARD))
    write_shards(source, out, WriterOptions(samples_per_shard=CIFAR_PER_SHARD, workers=1), split="test",
                 show_progress=False)
    return out / "test"


def cifar_job(cifar: Path) -> DeriveJob:
    """The job `polymodal data derive CIFAR OUT --add ALL --effnet-size 64` runs (class names from classnames.txt)."""
    return DeriveJob(ALL, DeriveOptions(**OPTIONS, classnames=find_classnames(str(cifar))))


@pytest.fixture(scope="module")
def cifar_derived(cifar, tmp_path_factory) -> tuple[Path, dict]:
    """Every derived modality of the CIFAR shards, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("cifar_derived")
    result = map_shards(str(cifar), out, cifar_job(cifar), workers=1, show_progress=False)
    return out, result


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, data_root) -> Path:
    """200 Fashion-MNIST test images as 2 shards, with classnames.txt beside them."""
    out = tmp_path_factory.mktemp("fashion_src")
    source = open_source(str(data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"),
                         SourceOptions(limit=200, classnames=FASHION))
    write_shards(source, out, WriterOptions(samples_per_shard=100, workers=1), split="test", show_progress=False)
    return out / "test"


def test_every_set_mirrors_the_source_and_decodes_through_the_registry(cifar, cifar_derived):
    out, result = cifar_derived
    names = sorted(p.name for p in cifar.glob("*.tar"))
    assert len(names) == CIFAR_SHARDS and result["samples"] == CIFAR_SHARDS * CIFAR_PER_SHARD
    assert result["failures"] == {} and result["stats"] is not None
    source_keys = {n: list(members(cifar / n)) for n in names}
    for name in DERIVED:
        folder = out / name
        assert sorted(p.name for p in folder.glob("*.tar")) == names, name
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["shards"] == CIFAR_SHARDS and stats["samples"] == CIFAR_SHARDS * CIFAR_PER_SHARD, name
        modality = modalities.get(name)
        for shard in names:
            written = members(folder / shard)
            assert list(written) == source_keys[shard], (name, shard)  # same keys, same order
            for key, m in list(written.items())[:5]:
                assert list(m) == [modality.extensions[0]]
                value = modality.decode(m[modality.extensions[0]], modality.extensions[0],
                                        modalities.DEFAULT_MAX_IMAGE_PIXELS)
                tensor = modality.to_tensor(value) if modality.to_tensor else value
                if name in ("grey", "edges"):
                    assert tensor.shape == (1, 32, 32) and tensor.dtype == torch.uint8
                    if name == "edges":
                        assert set(tensor.unique().tolist()) <= {0, 255}
                elif name in ("clusters", "fgmask"):
                    assert tensor.shape == (1, 32, 32) and tensor.dtype == torch.int64
                    assert int(tensor.max()) < (8 if name == "clusters" else 11)
                elif name == "hog":
                    assert tensor.shape == (9, 4, 4) and tensor.dtype == torch.float32 and 0 <= float(tensor.min())
                    assert float(torch.linalg.vector_norm(tensor, dim=0).max()) <= 1.001
                elif name == "effnet_map":
                    assert tensor.shape == (112, 4, 4) and torch.isfinite(tensor).all() and tensor.abs().sum() > 0
                elif name == "effnet_caption":
                    assert value.startswith("a photo of ") and ", or a" in value
                else:
                    assert isinstance(value, str) and value.startswith("v")
    summary = json.loads((out / "stats.json").read_text())
    assert summary["samples_read"] == CIFAR_SHARDS * CIFAR_PER_SHARD
    assert summary["settings"]["options"]["effnet_size"] == 64
    assert "metadata_ranges" in summary["settings"]


def test_resume_after_sigkill_is_byte_identical(cifar, cifar_derived, tmp_path):
    reference, _ = cifar_derived
    out = tmp_path / "derived"
    cmd = [*polymodal_cmd(), "data", "derive", str(cifar), str(out), "--add", ALL, *CLI_OPTIONS, "--workers", "1",
           "-q"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "_progress").glob("*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = len(list((out / "_progress").glob("*.json")))
    assert 1 <= finished < CIFAR_SHARDS  # killed in the middle of the job
    # Without --resume the finished shards are not silently redone or overwritten (the CLI's job, in this process).
    with pytest.raises(ConfigError, match="--resume"):
        map_shards(str(cifar), out, cifar_job(cifar), workers=1, show_progress=False)
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"in {CIFAR_SHARDS - finished} shards" in resumed.stdout and "already done" in resumed.stdout
    for name in DERIVED:
        shards = sorted(p.name for p in (reference / name).glob("*.tar"))
        assert sorted(p.name for p in (out / name).glob("*.tar")) == shards
        assert not list((out / name).glob("*.tmp"))
        for shard in shards:
            assert (out / name / shard).read_bytes() == (reference / name / shard).read_bytes(), (name, shard)
        assert json.loads((out / name / "stats.json").read_text()) == json.loads(
            (reference / name / "stats.json").read_text())


def test_hog_of_flat_and_edge_images_and_of_a_real_one(cifar, cifar_derived):
    flat = torch.full((1, 3, 32, 32), 90, dtype=torch.uint8)
    assert float(derive.hog(flat).abs().max()) < 1e-5  # float rounding in the convolution, no more
    step = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    step[..., 16:] = 200  # a vertical edge between columns 15 and 16: a horizontal gradient, bin 0
    cells = derive.hog(step)[0]  # [9, 4, 4]
    assert cells.shape == (9, 4, 4)
    assert (cells[0, :, 1:3] > 0.99).all() and float(cells[1:, :, 1:3].abs().max()) < 1e-3
    assert float(cells[:, :, [0, 3]].abs().max()) < 1e-5  # cells away from the edge
    across = derive.hog(step.transpose(-1, -2).contiguous(), bins=8)[0]  # a horizontal edge: 90 degrees, bin 4 of 8
    assert (across[4, 1:3, :] > 0.99).all() and float(across[torch.arange(8) != 4].abs().max()) < 1e-3
    # A real image: the stored map is derive.hog of the source image (to float16), and mirroring the image mirrors
    # the cells and the orientations (theta -> pi - theta: bin b -> (bins - b) % bins).
    reference, _ = cifar_derived
    keys, rgb, _ = images(cifar / "0.tar")
    stored = members(reference / "hog" / "0.tar")
    computed = derive.hog(rgb[:8])
    for i in range(8):
        h = np.load(io.BytesIO(stored[keys[i]]["hog.npy"]))
        assert h.dtype == np.float16 and h.shape == (9, 4, 4)
        assert np.abs(h.astype(np.float32) - computed[i].numpy()).max() < 1e-3
    mirrored = derive.hog(rgb[:8].flip(-1))
    expected = computed.flip(-1)[:, (9 - torch.arange(9)) % 9]
    assert torch.allclose(mirrored, expected, atol=1e-4)
    assert float(computed.amax(dim=(2, 3)).max()) > 0.5  # real images have strong oriented cells


def test_colour_clusters_of_real_images(cifar, cifar_derived):
    two = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    two[:, 1, :, :10] = 180  # green on 10 columns, black on 6
    assert derive.colour_clusters(two, k=2)[0].tolist() == [[0] * 10 + [1] * 6] * 16  # largest cluster is 0
    from kornia.color import rgb_to_lab

    reference, _ = cifar_derived
    keys, rgb, _ = images(cifar / "1.tar")
    stored = members(reference / "clusters" / "1.tar")
    for i in range(10):
        index = torch.from_numpy(np.asarray(modalities.decode_dense(stored[keys[i]]["clusters.png"], "png"))).long()
        counts = torch.bincount(index.flatten(), minlength=8)
        assert index.shape == (32, 32) and int(index.max()) < 8 and len(counts) == 8
        assert (counts[:-1] >= counts[1:]).all()  # numbered largest first
        used = counts > 0
        lab = rgb_to_lab(rgb[i:i + 1].float() / 255)[0].flatten(1).T  # [1024, 3]
        means = torch.stack([lab[index.flatten() == c].mean(0) for c in torch.nonzero(used).flatten()])
        nearest = torch.nonzero(used).flatten()[torch.cdist(lab, means).argmin(1)]
        assert float((nearest == index.flatten()).float().mean()) > 0.9  # a k-means fixpoint, nearly
        assert used.sum() >= 3  # a real photo has several colours


def test_fashion_masks_boxes_palettes_and_metadata_round_trip(fashion, tmp_path):
    out = tmp_path / "derived"
    cmd = [*polymodal_cmd(), "data", "derive", str(fashion), str(out), "--add", "box,fgmask,palette,metadata",
           "--workers", "1", "-q"]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "derived fgmask,box,palette,metadata for 200 samples in 2 shards" in result.stdout
    assert json.loads((out / "box" / "stats.json").read_text())["classnames"] == FASHION  # found beside the shards
    for shard in ("0.tar", "1.tar"):
        keys, rgb, labels = images(fashion / shard)
        masks, boxes = members(out / "fgmask" / shard), members(out / "box" / shard)
        palettes, metas = members(out / "palette" / shard), members(out / "metadata" / shard)
        assert list(masks) == list(boxes) == list(palettes) == list(metas) == keys
        figures = derive.metadata(rgb)
        figures["foreground_area"] = derive.foreground_area(rgb)
        seeds = [sample_rng(0, shard, i).randrange(1 << 31) for i in range(len(keys))]
        colours = derive.palette(rgb, 5, 10, seeds)
        for i, key in enumerate(keys):
            mask = modalities.label_map_tensor(modalities.decode_dense(masks[key]["fgmask.png"], "fgmask.png"))[0]
            assert set(mask.unique().tolist()) == {0, labels[i] + 1}
            assert torch.equal(mask, derive.foreground_mask(rgb[i:i + 1], torch.tensor([labels[i]]))[0])
            box = derive.boxes(mask[None])[0].tolist()
            text = boxes[key]["box.txt"].decode()
            assert text == box_text(tuple(box), 28, 28, FASHION[labels[i]])
            bins, name = parse_box(text)
            assert name == FASHION[labels[i]]
            assert bins == (round(box[0] / 28 * 255), round(box[1] / 28 * 255), round((box[2] + 1) / 28 * 255),
                            round((box[3] + 1) / 28 * 255))
            pal = parse_palette(palettes[key]["palette.txt"].decode())
            assert len(pal) == 5 and (torch.tensor(pal) - colours[i].int()).abs().max() <= 1
            meta = parse_metadata(metas[key]["metadata.txt"].decode(), derive.METADATA_RANGES)
            assert list(meta) == list(derive.METADATA_RANGES)
            for k, (low, high) in derive.METADATA_RANGES.items():
                value = float(figures[k][i]) if k in figures else 28.0
                half_bin = (high - low) / 256 / 2
                assert abs(meta[k] - min(max(value, low + half_bin), high - half_bin)) <= half_bin + 1e-4, (k, value)


def test_photos_of_many_sizes_get_effnet_captions_that_name_them(tmp_path, data_root):
    """16 ImageNet photos, each of its own size (one batch, processed size by size): maps follow each image's size,
    and EfficientNet-Lite0's top-2 caption names the photo's class for most of them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    source = open_source(str(data_root / "imagenet-samples" / "captions_wordnet.jsonl"),
                         SourceOptions(label_field="wnid", classnames=list(IMAGENET_CLASSNAMES), shuffle=True,
                                       limit=16))
    write_shards(source, tmp_path / "src", WriterOptions(samples_per_shard=16, workers=1), show_progress=False)
    out = tmp_path / "derived"
    result = map_shards(str(tmp_path / "src"), out, DeriveJob("hog,effnet_map,effnet_caption"), workers=1,
                        show_progress=False)
    assert result["samples"] == 16 and result["failures"] == {}
    keys, sizes, labels = [], [], []
    for key, m in members(tmp_path / "src" / "0.tar").items():
        keys.append(key)
        sizes.append(modalities.open_rgb(m["jpg"]).size)
        labels.append(int(m["cls"]))
    assert len(set(sizes)) > 8  # many sizes in one batch
    hogs, maps = members(out / "hog" / "0.tar"), members(out / "effnet_map" / "0.tar")
    captions = members(out / "effnet_caption" / "0.tar")
    named = 0
    for key, (width, height), label in zip(keys, sizes, labels):
        assert np.load(io.BytesIO(hogs[key]["hog.npy"])).shape == (9, height // 8, width // 8)
        assert np.load(io.BytesIO(maps[key]["effnet_map.npy"])).shape == (112, 14, 14)
        named += f" {IMAGENET_CLASSNAMES[label]}," in captions[key]["effnet_caption.txt"].decode() + ","
    assert named >= 12, named  # 15 of these 16 photos when written
