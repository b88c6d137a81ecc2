"""Batches of the mixed LiT recipe mix their sources: shards each hold one source (emoji, CIFAR-10, Fashion-MNIST
pairs), and the recipe's shuffle buffer must spread them over every batch (issue 15). Real shards, the recipe's
own data settings."""

from __future__ import annotations

import pytest

from conftest import REPO
from polymodal.data.batch_mix import BatchMix
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.pretrain.config import load_pretrain_config


@pytest.fixture(scope="module")
def one_source_per_shard(tmp_path_factory, data_root, emoji_shards):
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    out = tmp_path_factory.mktemp("mixed")
    templates = (REPO / "recipes" / "label-caption-templates.txt").read_text().splitlines()
    for name, path, extra in (
            ("cifar10-pairs", data_root / "cifar10" / "train.tar.gz", {}),
            ("fmnist-pairs", data_root / "fashion-mnist" / "train-images-idx3-ubyte.gz",
             {"classnames": "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")})):
        source = open_source(str(path), SourceOptions(limit=1000, label_captions=templates, **extra))
        write_shards(source, out / name, WriterOptions(samples_per_shard=250, workers=1), show_progress=False)
    return [f"{emoji_shards}/{{0..1}}.tar", f"{out}/cifar10-pairs/{{0..3}}.tar", f"{out}/fmnist-pairs/{{0..3}}.tar"]


def mix(shards, overrides, emoji_weight: float | None = None) -> BatchMix:
    """The mix of 45 batches after the first 15 (while the buffer fills, batches come from the first shards read),
    with the recipe's data settings; emoji pairs drawn emoji_weight times as often as the others (None: uniform)."""
    cfg = load_pretrain_config(REPO / "configs" / "align-mixed.yaml", overrides)
    cfg.data.shards = shards
    cfg.data.shard_weights = [emoji_weight, 1, 1] if emoji_weight else []
    loader = iter(ShardLoader(cfg.data, where=Placement(0, 1)))
    measured = BatchMix()
    for i in range(60):
        batch = next(loader)
        if i >= 15:
            measured.add(batch)
    return measured


def test_the_recipe_mixes_sources_within_batches(one_source_per_shard):
    """The shuffle buffer, with sources drawn uniformly."""
    recipe = mix(one_source_per_shard, [])
    small_buffer = mix(one_source_per_shard, ["data.shuffle_buffer=500", "data.shuffle_initial=100"])
    # 1,000 samples from each of 3 sources: a perfect mix gives each about a third of a batch. Measured: the
    # recipe's largest source holds 40% of a batch, a 500-sample buffer's 58%.
    assert recipe.sources_per_batch >= 2.7 and recipe.largest_source_share < 0.5, recipe
    assert small_buffer.largest_source_share > recipe.largest_source_share + 0.08, (small_buffer, recipe)
    # Two of the three sources caption 10 classes with 6 templates, so captions repeat in any batch; a better mix
    # repeats them less (measured: 55% distinct against 49%).
    assert recipe.distinct_caption_share > small_buffer.distinct_caption_share + 0.03, (recipe, small_buffer)


def test_the_recipe_draws_its_emoji_pairs_more_often(one_source_per_shard):
    """The recipe's data.shard_weights: an emoji pair is drawn 7x as often as a class-captioned one, so with 1,000
    pairs from each source the emoji hold 7/9 of the samples; every batch still holds all three sources."""
    weight = load_pretrain_config(REPO / "configs" / "align-mixed.yaml", []).data.shard_weights[0]
    weighted = mix(one_source_per_shard, [], emoji_weight=weight)
    emoji = next(share for source, share in weighted.source_shares.items() if "emoji" in source)
    assert abs(emoji - weight / (weight + 2)) < 0.1, weighted.summary()
    assert weighted.sources_per_batch >= 2.7, weighted.summary()
