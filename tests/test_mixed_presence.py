"""Batches that mix samples with and without an optional modality: a presence mask per modality, absent rows
filled, and no sample lost (collate once took the keys of the first sample and crashed on a later one)."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from conftest import REPO
from polymodal.data.collate import collate
from polymodal.data.config import DataConfig
from polymodal.data.pipeline import ShardLoader


@pytest.fixture(scope="module")
def captions_for_two_thirds(tmp_path_factory):
    """The first demo shard (real emoji pairs) with the caption member of every third sample removed."""
    out = tmp_path_factory.mktemp("mixed-presence") / "0.tar"
    dropped = set()
    with tarfile.open(REPO / "polymodal" / "demo_data" / "train" / "0.tar.gz") as src, tarfile.open(out, "w") as dst:
        for member in src:
            key, ext = member.name.split(".", 1)
            if ext == "txt" and int(key) % 3 == 0:
                dropped.add(key)
                continue
            dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
    return out, dropped


@pytest.mark.parametrize("tokenize", [False, True], ids=["strings", "token-ids"])
def test_a_batch_mixes_samples_with_and_without_captions(captions_for_two_thirds, tokenize):
    shard, dropped = captions_for_two_thirds
    tokenizer = (lambda text: torch.tensor([ord(c) for c in text][:20])) if tokenize else None
    loader = ShardLoader(DataConfig(shards=[str(shard)], modalities=["rgb"], optional_modalities=["caption"],
                                    image_size=32, batch_size=16, num_workers=1, shuffle_buffer=50), tokenizer=tokenizer)
    keys, mixed = [], 0
    for batch in loader:
        present = batch["caption_present"] if "caption_present" in batch else torch.ones(len(batch["__key__"]),
                                                                                         dtype=torch.bool)
        mixed += bool(present.any() and not present.all())
        for key, here in zip(batch["__key__"], present.tolist()):
            assert here == (key not in dropped)
        if tokenize:  # absent rows: length 0, all padding
            lengths = batch["caption_lengths"]
            assert (lengths[~present] == 0).all() and (lengths[present] > 0).all()
            assert (batch["caption"][~present] == 0).all()
        else:
            assert [c is None for c in batch["caption"]] == (~present).tolist()
        keys += batch["__key__"]
    assert len(keys) == 500 and len(set(keys) & dropped) == len(dropped) > 150  # nothing lost
    assert mixed >= 10 and loader.skip_counts() == {}


def test_collate_fills_absent_rows_by_type():
    samples = [{"a": torch.ones(2, 3), "n": 3, "s": "x"}, {"s": "y"}, {"a": torch.full((2, 3), 2.0), "n": 5}]
    batch = collate(samples)
    assert batch["a_present"].tolist() == [True, False, True] and batch["a"][1].abs().sum() == 0
    assert batch["a"].shape == (3, 2, 3) and batch["n"].tolist() == [3, 0, 5]
    assert batch["s"] == ["x", "y", None] and batch["s_present"].tolist() == [True, True, False]
    assert "a_present" not in collate(samples[:1])  # every sample has it: no mask


def test_captions_missing_for_a_third_and_derived_edges_for_another_third(captions_for_two_thirds, tmp_path):
    """Real Canny edges of the same emoji, in a joined shard set that lacks every third sample from key 1 on: both
    optional modalities get their own presence mask, and every sample still arrives."""
    import numpy as np

    from polymodal.data import derive
    from polymodal.data.writer import ShardFile
    from polymodal.modalities import open_rgb, png_bytes, rgb_tensor

    shard, no_caption = captions_for_two_thirds
    edges_dir = tmp_path / "edges"
    edges_dir.mkdir()
    out, no_edges = ShardFile(edges_dir / shard.name), set()
    with tarfile.open(shard) as src:
        for member in src:
            key, ext = member.name.split(".", 1)
            if ext != "png":
                continue
            if int(key) % 3 == 1:
                no_edges.add(key)
                continue
            rgb = rgb_tensor(open_rgb(src.extractfile(member).read()))[None]
            out.add(key, {"edges.png": png_bytes((derive.edges(rgb)[0, 0].numpy() * 255).astype(np.uint8))})
    out.close()
    loader = ShardLoader(DataConfig(shards=[str(shard)], join=[str(edges_dir)], modalities=["rgb"],
                                    optional_modalities=["caption", "edges"], image_size=32, batch_size=16,
                                    num_workers=1, shuffle_buffer=50))
    keys = []
    for batch in loader:
        everyone = torch.ones(len(batch["__key__"]), dtype=torch.bool)  # a batch that is not mixed has no mask
        for i, key in enumerate(batch["__key__"]):
            assert bool(batch.get("caption_present", everyone)[i]) == (key not in no_caption)
            assert bool(batch.get("edges_present", everyone)[i]) == (key not in no_edges)
            assert (batch["edges"][i].sum() > 0) == (key not in no_edges)  # real edges, zeros when absent
        keys += batch["__key__"]
    assert len(keys) == 500 and len(no_edges) > 150 and not no_edges & no_caption
    assert loader.skip_counts() == {}
