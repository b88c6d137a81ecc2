"""Shared fixtures: paths to the real data in ../shared/data and shards built from it once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.exists():
        pytest.fail(f"real test data not found at {DATA} (expected ../shared/data beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory, data_root) -> Path:
    """The emoji pairs as 4 plain shards (source order kept, so keys follow captions.jsonl)."""
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    out = tmp_path_factory.mktemp("emoji")
    source = open_source(str(data_root / "emoji" / "captions.jsonl"), SourceOptions(caption="{name}"))
    write_shards(source, out, WriterOptions(samples_per_shard=500, workers=2), show_progress=False)
    return out


@pytest.fixture(scope="session")
def cifar_test_shards(tmp_path_factory, data_root) -> Path:
    """CIFAR-10 test (10,000 JPEGs) as 10 shards in CLIP_benchmark's layout (split 'test')."""
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    out = tmp_path_factory.mktemp("cifar10")
    source = open_source(str(data_root / "cifar10" / "test.tar.gz"), SourceOptions(shuffle=True))
    write_shards(source, out, WriterOptions(samples_per_shard=1000, workers=2), split="test", show_progress=False)
    return out


def export_tokenizer(out: Path, name: str = "fsq", image_size: int = 32, **config) -> Path:
    """An image tokenizer exported as training exports one (weights seeded, untrained: tokens are still valid)."""
    import json

    import torch

    from polymodal.pretrain.export import write_safetensors
    from polymodal.pretrain.objectives import build_objective

    torch.manual_seed(0)
    section = {"name": name, "width": 8, **config}
    objective = build_objective(section)
    return write_safetensors(objective.state_dict(), out / "model.safetensors",
                             {"polymodal.objective": json.dumps(section), "polymodal.step": "0",
                              "polymodal.image_size": str(image_size)})


@pytest.fixture(scope="session")
def tokenized_emoji(tmp_path_factory, emoji_shards):
    """The emoji pairs tokenized: rgb by an FSQ tokenizer (3 crops), captions by a WordPiece vocabulary."""
    from polymodal.data.shard_map import map_shards
    from polymodal.data.tokenize_shards import TokenizeJob, TokenizeOptions
    from polymodal.tokenizers.cli import read_texts
    from polymodal.tokenizers.text import train_wordpiece

    root = tmp_path_factory.mktemp("tok")
    tokenizer = export_tokenizer(root / "fsq")
    train_wordpiece(read_texts(str(emoji_shards), None), vocab_size=1500, sentinels=10).save(root / "wp" /
                                                                                              "tokenizer.json")
    job = TokenizeJob({"rgb": str(tokenizer.parent)}, {"caption": str(root / "wp")}, TokenizeOptions(crops=3),
                      seed=0)
    result = map_shards(str(emoji_shards), root / "out", job, workers=1, show_progress=False)
    return root, result


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): small
    models run faster so on 2 shared cores, and results do not depend on the machine's thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cifar_test_images(data_root: Path, count: int, size: int):
    """The first `count` CIFAR-10 test JPEGs, resized to `size` px and ImageNet-normalised: float [count, 3, size,
    size]."""
    import io
    import tarfile

    import torch
    from PIL import Image

    pictures = []
    with tarfile.open(data_root / "cifar10" / "test.tar.gz") as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                with Image.open(io.BytesIO(archive.extractfile(member).read())) as picture:
                    pictures.append(picture.convert("RGB").resize((size, size), Image.BILINEAR))
                if len(pictures) == count:
                    break
    rgb = torch.stack([torch.frombuffer(bytearray(p.tobytes()), dtype=torch.uint8) for p in pictures])
    rgb = rgb.view(-1, size, size, 3).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def polymodal_cmd() -> list[str]:
    return [sys.executable, "-m", "polymodal"]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
