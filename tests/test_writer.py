"""Shard writing from real datasets, read back by the plain webdataset library and by `tar`."""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import polymodal_cmd, subprocess_env
from polymodal.data.errors import ConfigError
from polymodal.data.idx import read_idx
from polymodal.data.sources import SourceOptions, open_source
from polymodal.data.writer import WriterOptions, write_shards


def read_with_webdataset(shard_dir: Path, pattern: str = "*.tar") -> list[dict]:
    urls = sorted(str(p) for p in shard_dir.glob(pattern))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def tar_listing(path: Path) -> list[str]:
    out = subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split()


def test_cifar10_test_tarball(cifar_test_shards: Path, data_root: Path):
    shard_dir = cifar_test_shards / "test"
    stats = json.loads((shard_dir / "stats.json").read_text())
    assert stats["samples"] == 10_000 and stats["shards"] == 10 and stats["failures"] == {}
    assert (shard_dir / "nshards.txt").read_text().strip() == "10"
    classes = (cifar_test_shards / "classnames.txt").read_text().split()
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    templates = (cifar_test_shards / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)

    # tar sees exactly 3 members per sample in every shard
    members = [name for i in range(10) for name in tar_listing(shard_dir / f"{i}.tar")]
    assert len(members) == 30_000

    # webdataset reads every sample; the bytes are the original JPEG files, labels match their folders
    samples = read_with_webdataset(shard_dir)
    assert len(samples) == 10_000
    original = {}
    with tarfile.open(data_root / "cifar10" / "test.tar.gz") as tar:
        for member in tar:
            if member.isfile():
                original[member.name] = tar.extractfile(member).read()
    per_class = {c: 0 for c in classes}
    for sample in samples:
        source = json.loads(sample["json"])["source"]
        assert sample["jpg"] == original[source]
        label = int(sample["cls"])
        assert source.split("/")[1] == classes[label]
        per_class[classes[label]] += 1
    assert set(per_class.values()) == {1000}
    # the seeded shuffle mixes classes inside each shard
    first_shard = [int(s["cls"]) for s in samples[:1000]]
    assert len(set(first_shard)) == 10


def test_fashion_mnist_idx(tmp_path: Path, data_root: Path):
    images_path = data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    names = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
    source = open_source(str(images_path), SourceOptions(classnames=names.split(",")))
    stats = write_shards(source, tmp_path, WriterOptions(samples_per_shard=2500, workers=2), show_progress=False)
    assert stats["samples"] == 10_000 and stats["shards"] == 4
    images = read_idx(images_path)
    labels = read_idx(data_root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz")
    samples = read_with_webdataset(tmp_path)
    assert len(samples) == 10_000
    for sample in samples[::97]:
        index = int(json.loads(sample["json"])["source"].split("[")[1].rstrip("]"))
        decoded = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert np.array_equal(decoded, images[index])  # PNG is lossless: identical pixels
        assert int(sample["cls"]) == labels[index]
    assert (tmp_path / "classnames.txt").read_text().splitlines()[0] == "T-shirt/top"


def test_label_captions_from_class_names(tmp_path: Path, data_root: Path):
    """A labelled set joins image-text pretraining: each sample gets a caption from its class name."""
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\na blurry photo of the {c}.\n")
    out = tmp_path / "shards"
    subprocess.run(polymodal_cmd() + ["data", "shards", str(data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"),
                                 str(out), "--limit", "300", "--label-captions", str(templates), "--classnames",
                                 "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot", "-q"],
                   check=True, env=subprocess_env(), capture_output=True)
    names = (out / "classnames.txt").read_text().splitlines()
    samples = read_with_webdataset(out)
    assert len(samples) == 300
    used = set()
    for sample in samples:
        caption, label = sample["txt"].decode(), int(sample["cls"])
        template = next(t for t in templates.read_text().splitlines() if t.replace("{c}", names[label]) == caption)
        used.add(template)
    assert len(used) == 2  # both templates are drawn
    with pytest.raises(ConfigError, match="no {c}"):
        open_source(str(data_root / "mnist10k" / "mnist10k_npm.npz"), SourceOptions(label_captions=["a digit"]))
    with pytest.raises(ConfigError, match="needs labelled data"):
        open_source(str(data_root / "emoji" / "captions.jsonl"), SourceOptions(label_captions=["a {c}"]))


def test_table_label_ids_with_display_names(tmp_path: Path, data_root: Path):
    """ImageNet wnids as labels: their sorted order is the standard index; --classnames gives readable names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    table = data_root / "imagenet-samples" / "captions_wordnet.jsonl"
    source = open_source(str(table), SourceOptions(label_field="wnid", classnames=list(IMAGENET_CLASSNAMES),
                                                   caption="{gloss}", limit=40))
    write_shards(source, tmp_path, WriterOptions(samples_per_shard=40), show_progress=False)
    wnids = sorted(json.loads(line)["wnid"] for line in table.read_text().splitlines())
    samples = read_with_webdataset(tmp_path)
    assert len(samples) == 40
    for sample in samples:  # the wnid is the image name's prefix (the label field itself becomes .cls)
        assert wnids[int(sample["cls"])] == json.loads(sample["json"])["source"].split("_")[0]
    assert (tmp_path / "classnames.txt").read_text().splitlines()[:2] == ["tench", "goldfish"]


def test_mnist_npz(tmp_path: Path, data_root: Path):
    source = open_source(str(data_root / "mnist10k" / "mnist10k_npm.npz"), SourceOptions(limit=1200))
    stats = write_shards(source, tmp_path, WriterOptions(samples_per_shard=500), show_progress=False)
    assert stats["samples"] == 1200 and stats["shards"] == 3
    assert len(read_with_webdataset(tmp_path)) == 1200
    assert (tmp_path / "classnames.txt").read_text().split() == [str(i) for i in range(10)]


def test_emoji_pairs_content(emoji_shards: Path, data_root: Path):
    rows = [json.loads(line) for line in (data_root / "emoji" / "captions.jsonl").read_text().splitlines()]
    samples = read_with_webdataset(emoji_shards)
    assert len(samples) == len(rows) == 1911
    listed = [n for p in sorted(emoji_shards.glob("*.tar")) for n in tar_listing(p)]
    assert len(listed) == 3 * 1911
    # source order kept: sample i is row i, the PNG bytes are the original file, the caption its name
    for sample, row in zip(samples, rows):
        assert sample["png"] == (data_root / "emoji" / row["image"]).read_bytes()
        assert sample["txt"].decode() == row["name"]
        assert json.loads(sample["json"])["category"] == row["category"]
    assert (emoji_shards / "dataset_type.txt").read_text().strip() == "retrieval"


def test_resize_reencode_and_size_limit(tmp_path: Path, data_root: Path):
    source = open_source(str(data_root / "imagenet-samples" / "captions_wordnet.jsonl"),
                         SourceOptions(caption="{gloss}", limit=40, shuffle=False))
    opts = WriterOptions(samples_per_shard=1000, max_shard_bytes=200_000, resize=128, image_format="webp",
                         quality=80, workers=2)
    stats = write_shards(source, tmp_path, opts, show_progress=False)
    assert stats["samples"] == 40
    shards = sorted(tmp_path.glob("*.tar"))
    assert len(shards) == stats["shards"] > 1  # the byte limit closed shards before the count limit
    samples = read_with_webdataset(tmp_path)
    for sample in samples:
        img = Image.open(io.BytesIO(sample["webp"]))
        assert max(img.size) == 128 or max(img.size) < 128
    # a small shard may exceed the limit only by its last sample
    assert all(p.stat().st_size < 200_000 + 60_000 for p in shards)


def test_gzip_shards_reproducible(tmp_path: Path, data_root: Path):
    def build(out):
        source = open_source(str(data_root / "emoji" / "captions.jsonl"), SourceOptions(caption="{name}", limit=300))
        write_shards(source, out, WriterOptions(samples_per_shard=100, compress=True, workers=2), show_progress=False)
        return sorted(out.glob("*.tar.gz"))

    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert [p.name for p in first] == ["0.tar.gz", "1.tar.gz", "2.tar.gz"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    with gzip.open(first[0]) as f, tarfile.open(fileobj=f) as tar:
        assert len(tar.getnames()) == 300
    assert len(read_with_webdataset(tmp_path / "a", "*.tar.gz")) == 300


def test_refuses_to_overwrite_without_flag(tmp_path: Path, data_root: Path):
    source = open_source(str(data_root / "mnist10k" / "mnist10k_npm.npz"), SourceOptions(limit=10))
    write_shards(source, tmp_path, WriterOptions(), show_progress=False)
    with pytest.raises(ConfigError, match="--resume|--overwrite"):
        write_shards(source, tmp_path, WriterOptions(), show_progress=False)


def test_interrupted_conversion_resumes_to_identical_shards(tmp_path: Path, data_root: Path):
    """kill -9 the CLI mid-conversion, resume: finished shards are kept, and the result equals a clean run."""
    source = str(data_root / "cifar10" / "test.tar.gz")
    args = ["data", "shards", source, "--samples-per-shard", "500", "--workers", "1", "-q"]
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    subprocess.run([*polymodal_cmd(), *args[:2], source, str(clean), *args[3:]], check=True, env=subprocess_env())

    proc = subprocess.Popen([*polymodal_cmd(), *args[:2], source, str(broken), *args[3:]], env=subprocess_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(broken.glob("*.tar"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in broken.glob("*.tar")}
    assert 3 <= len(finished) < 20, "the kill should land mid-conversion"
    assert not (broken / "stats.json").exists()

    subprocess.run([*polymodal_cmd(), *args[:2], source, str(broken), *args[3:], "--resume"], check=True,
                   env=subprocess_env())
    clean_files = sorted(p.name for p in clean.glob("*.tar"))
    assert sorted(p.name for p in broken.glob("*.tar")) == clean_files and len(clean_files) == 20
    for name in clean_files:
        assert (clean / name).read_bytes() == (broken / name).read_bytes(), name
    # shards finished before the kill were kept, not rewritten (all but possibly the last one listed)
    kept = sorted(finished, key=lambda n: int(n.split(".")[0]))[:-1]
    assert all((broken / n).stat().st_mtime_ns == finished[n] for n in kept)
    assert not list(broken.glob("*.tmp"))
    assert json.loads((broken / "stats.json").read_text())["samples"] == 10_000


def test_the_writer_writes_any_registered_modality_through_the_registry(tmp_path: Path, data_root: Path):
    """A source whose records carry derived modalities (an edge map, a segmentation, token ids, palette text)
    beside the image: each is written under its registered extension and reads back through the pipeline."""
    import torch

    from polymodal.data import derive
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.data.sources import Source

    x = np.load(data_root / "mnist10k" / "mnist10k_npm.npz")["x"][:40]
    y = np.load(data_root / "mnist10k" / "mnist10k_npm.npz")["y"][:40]
    rgb = torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1)
    edges = derive.edges(rgb)[:, 0].numpy() * 255
    masks = derive.foreground_mask(rgb, torch.from_numpy(y)).numpy().astype(np.uint8)

    class WithDerived(Source):
        length = 40
        classnames = None

        def records(self):
            for i in range(40):
                yield {"rgb": x[i], "label": int(y[i]), "edges": edges[i], "semseg": masks[i],
                       "tok_rgb": np.full((1, 7, 7), i, np.uint16), "palette": "v1=1 v0=0 v0=0 v0=0",
                       "source": f"mnist/{i}"}

    stats = write_shards(WithDerived(), tmp_path, WriterOptions(samples_per_shard=40), show_progress=False)
    assert stats["modalities"] == {"rgb": 40, "label": 40, "edges": 40, "semseg": 40, "tok_rgb": 40,
                                   "palette": 40, "json": 40}
    with tarfile.open(tmp_path / "0.tar") as tar:
        assert {n.split(".", 1)[1] for n in tar.getnames()} == {"png", "cls", "edges.png", "semseg.png",
                                                                 "tok_rgb.npy", "palette.txt", "json"}
    batch = next(iter(ShardLoader(DataConfig(shards=str(tmp_path), modalities=["edges", "semseg", "tok_rgb",
                                                                              "palette", "label"],
                                             image_size=None, batch_size=40, num_workers=0, shuffle_buffer=0))))
    assert torch.equal(batch["semseg"], torch.from_numpy(masks).long())
    assert torch.equal(batch["edges"][:, 0], torch.from_numpy(edges.astype(np.uint8)))
    assert torch.equal(batch["tok_rgb"][:, 0, 0], torch.arange(40)) and batch["palette"][0] == "v1=1 v0=0 v0=0 v0=0"
