"""The reading pipeline on real shards: splitting across ranks and workers, exact resume, augmentation."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, subprocess_env
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement

READ_KEYS = str(REPO / "tests" / "read_keys.py")


def run_reader(out: Path, shards: Path, *overrides: str, torchrun: bool = False, **flags) -> list[dict]:
    args = [READ_KEYS, str(out), str(shards), *overrides]
    for flag, value in flags.items():
        args += [f"--{flag}", str(value)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    else:
        cmd = [sys.executable, *args]
    subprocess.run(cmd, check=True, env=subprocess_env(), timeout=600)
    if torchrun:
        return [json.loads(out.with_name(out.stem + f".rank{r}.json").read_text()) for r in range(2)]
    return [json.loads(out.read_text())]


def keys_of(result: dict) -> list[str]:
    return [k for batch in result["batches"] for k in batch]


def test_two_ranks_two_workers_epoch_sees_each_sample_once(tmp_path, cifar_test_shards):
    results = run_reader(tmp_path / "keys.json", cifar_test_shards / "test", "num_workers=2", "batch_size=128",
                         "modalities=[rgb,label]", "image_size=16", torchrun=True)
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert all(r["workers"] == 2 for r in results)
    per_rank = [keys_of(r) for r in results]
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == 10_000
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert all(r["skips"] == {} for r in results)


def test_resume_in_fresh_process_gives_exactly_the_remaining_batches(tmp_path, emoji_shards):
    settings = ["num_workers=2", "batch_size=50", "shuffle_buffer=300", "image_size=24", "seed=7"]
    full = run_reader(tmp_path / "full.json", emoji_shards, *settings)[0]
    state = tmp_path / "state.json"
    first = run_reader(tmp_path / "first.json", emoji_shards, *settings, batches=13, save=state)[0]
    rest = run_reader(tmp_path / "rest.json", emoji_shards, *settings, resume=state)[0]
    assert len(full["batches"]) == 39
    assert first["batches"] + rest["batches"] == full["batches"]
    # same crops and flips too: the augmentation replays exactly
    assert first["pixel_sums"] + rest["pixel_sums"] == full["pixel_sums"]
    assert len(set(keys_of(full))) == 1911


def test_resume_across_two_ranks_and_resampled_mode(tmp_path, emoji_shards):
    settings = ["num_workers=2", "batch_size=32", "resampled=true", "shuffle_buffer=200", "image_size=16"]
    full = run_reader(tmp_path / "full.json", emoji_shards, *settings, torchrun=True, batches=24)
    state = tmp_path / "state.RANK.json"
    first = run_reader(tmp_path / "a.json", emoji_shards, *settings, torchrun=True, batches=10, save=state)
    rest = run_reader(tmp_path / "b.json", emoji_shards, *settings, torchrun=True, batches=14, resume=state)
    for rank in range(2):
        assert first[rank]["batches"] + rest[rank]["batches"] == full[rank]["batches"]
        assert first[rank]["pixel_sums"] + rest[rank]["pixel_sums"] == full[rank]["pixel_sums"]
    assert keys_of(full[0]) != keys_of(full[1])  # ranks draw their own shards and orders


def _loader(shards, **kw) -> ShardLoader:
    kw.setdefault("image_size", 16)
    kw.setdefault("num_workers", 0)
    return ShardLoader(DataConfig(shards=[str(shards)], **kw))


def _epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["__key__"]]


def test_seeded_order_and_epochs(emoji_shards):
    a = _epoch_keys(_loader(emoji_shards, seed=1, batch_size=100))
    b = _epoch_keys(_loader(emoji_shards, seed=1, batch_size=100))
    c = _epoch_keys(_loader(emoji_shards, seed=2, batch_size=100))
    assert a == b and a != c and sorted(a) == sorted(c)
    loader = _loader(emoji_shards, seed=1, batch_size=100)
    first, second = _epoch_keys(loader), _epoch_keys(loader)
    assert loader.epoch == 2 and first == a and second != first and sorted(second) == sorted(first)


def test_break_and_iterate_again_continues(emoji_shards):
    loader = _loader(emoji_shards, batch_size=64, num_workers=2, shuffle_buffer=200)
    reference = [b["__key__"] for b in _loader(emoji_shards, batch_size=64, num_workers=2, shuffle_buffer=200)]
    got = []
    for i, batch in enumerate(loader):
        got.append(batch["__key__"])
        if i == 4:
            break
    got += [b["__key__"] for b in loader]
    assert got == reference


def test_spec_forms_folder_brace_glob_list_and_fsspec(emoji_shards):
    n = 1911
    for spec in (str(emoji_shards), f"{emoji_shards}/{{0..3}}.tar", f"{emoji_shards}/*.tar",
                 f"{emoji_shards}/{{0..1}}.tar::{emoji_shards}/{{2..3}}.tar", f"file://{emoji_shards}/{{0..3}}.tar"):
        assert len(_epoch_keys(_loader(spec, batch_size=500))) == n, spec
    listed = ShardLoader(DataConfig(shards=[f"{emoji_shards}/0.tar", f"{emoji_shards}/1.tar"], num_workers=0))
    assert len(_epoch_keys(listed)) == 1000
    fs = fsspec.filesystem("memory")
    for i in range(4):
        fs.pipe(f"/polymodal-test/{i}.tar", (emoji_shards / f"{i}.tar").read_bytes())
    assert len(_epoch_keys(_loader("memory://polymodal-test/{0..3}.tar", batch_size=500))) == n


def test_epoch_mode_checks_shards_against_ranks_and_workers(emoji_shards, caplog):
    with pytest.raises(ConfigError, match="4 shards cannot feed 8 ranks.*resampled=true"):
        ShardLoader(DataConfig(shards=[str(emoji_shards)]), where=Placement(0, 8))
    with caplog.at_level(logging.WARNING):
        loader = ShardLoader(DataConfig(shards=[str(emoji_shards)], num_workers=4), where=Placement(1, 2))
    assert loader.num_workers == 2 and "using 2 workers per rank" in caplog.text
    assert ShardLoader(DataConfig(shards=[str(emoji_shards)], num_workers=8, resampled=True)).num_workers == 8


def test_state_from_other_setup_is_refused(emoji_shards):
    state = _loader(emoji_shards, num_workers=1).state_dict()
    with pytest.raises(ConfigError, match="num_workers was 1 now 2"):
        _loader(emoji_shards, num_workers=2).load_state_dict(state)


def test_tokenizer_hook_pads_sequences(emoji_shards):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    loader = ShardLoader(DataConfig(shards=[str(emoji_shards)], modalities=["rgb", "caption"], batch_size=16,
                                    num_workers=0, image_size=16, shuffle_buffer=0), tokenizer=tokenizer.encode)
    batch = next(iter(loader))
    tokens, lengths = batch["caption"], batch["caption_lengths"]
    assert tokens.dtype == torch.long and tokens.shape == (16, int(lengths.max()))
    assert len(set(lengths.tolist())) > 1  # captions of different lengths were padded
    rows = [json.loads(line) for line in (REPO.parent / "shared/data/emoji/captions.jsonl").read_text().splitlines()]
    by_key = {f"{i:09d}": row["name"] for i, row in enumerate(rows)}
    for key, row, n in zip(batch["__key__"], tokens, lengths):
        assert tokenizer.decode(row[:n].tolist()).strip() == tokenizer.decode(tokenizer.encode(by_key[key])).strip()
        assert (row[n:] == 0).all()


def _aligned_shard(path: Path, data_root: Path, count: int = 24) -> None:
    """Real photos with a 16-bit depth map and an 8-bit semseg map derived from them, depth at half resolution."""
    photos = sorted((data_root / "imagenet-samples").glob("*.JPEG"))[:count]
    with tarfile.open(path, "w") as tar:
        for i, photo in enumerate(photos):
            img = Image.open(photo).convert("RGB")
            gray = np.asarray(img.convert("L"), dtype=np.uint16)
            depth = Image.fromarray(gray * 257).resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR)
            semseg = Image.fromarray((np.asarray(img.convert("L")) // 64).astype(np.uint8))
            members = {"jpg": photo.read_bytes(), "depth.png": _png(depth), "semseg.png": _png(semseg)}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_crops_and_flips_are_shared_across_image_modalities(tmp_path, data_root):
    _aligned_shard(tmp_path / "0.tar", data_root)
    loader = _loader(tmp_path / "0.tar", modalities=["rgb", "depth", "semseg"], image_size=64, batch_size=24,
                     crop_scale=[0.1, 0.5], hflip=0.5)
    batch = next(iter(loader))
    assert batch["rgb"].shape == (24, 3, 64, 64) and batch["rgb"].dtype == torch.uint8
    assert batch["depth"].shape == (24, 1, 64, 64) and batch["depth"].dtype == torch.float32
    assert batch["semseg"].shape == (24, 64, 64) and batch["semseg"].dtype == torch.int64
    gray = (batch["rgb"].float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    for g, d, s in zip(gray, batch["depth"][:, 0] / 257, batch["semseg"]):
        assert np.corrcoef(g.flatten(), d.flatten())[0, 1] > 0.9
        assert set(s.unique().tolist()) <= {0, 1, 2, 3}
        # the same map flipped would match much worse: the flip was shared
        assert np.corrcoef(g.flatten(), d.flip(-1).flatten())[0, 1] < np.corrcoef(g.flatten(), d.flatten())[0, 1]
    eval_batch = next(iter(_loader(tmp_path / "0.tar", modalities=["rgb", "depth"], image_size=64, augment=False,
                                   batch_size=24, shuffle_buffer=0)))
    center = (eval_batch["rgb"].float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    assert all(np.corrcoef(g.flatten(), d.flatten())[0, 1] > 0.9
               for g, d in zip(center, eval_batch["depth"][:, 0]))


def test_fast_decode_matches_full_decode(tmp_path, data_root):
    """JPEG reduced-size decoding changes pixels only slightly against decoding at full size."""
    _aligned_shard(tmp_path / "0.tar", data_root, count=16)
    kw = dict(modalities=["rgb"], image_size=96, batch_size=16, shuffle_buffer=0, crop_scale=[0.6, 1.0])
    fast = next(iter(_loader(tmp_path / "0.tar", fast_decode=True, **kw)))["rgb"].float()
    full = next(iter(_loader(tmp_path / "0.tar", fast_decode=False, **kw)))["rgb"].float()
    assert (fast - full).abs().mean() < 6  # out of 255


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [False, True])
def test_shard_reader_matches_tarfile_whatever_the_header_format(tmp_path, data_root, tar_format, compress):
    """The fast ustar reader and its hand-over to tarfile (long names need GNU/pax headers mid-shard)."""
    from polymodal.data.tar_samples import iter_shard

    photos = sorted((data_root / "emoji" / "img64").glob("*.png"))[:12]
    path = tmp_path / ("0.tar.gz" if compress else "0.tar")
    expected = []
    with tarfile.open(path, "w:gz" if compress else "w", format=tar_format) as tar:
        for i, photo in enumerate(photos):
            # from the 6th sample on, names longer than a v7 header holds: ustar splits them into its prefix
            # field, GNU and pax put them in extra headers that the fast reader hands over to tarfile
            key = f"{i:03d}" if i < 6 else "d" * 120 + f"/{i:03d}"
            for ext, data in (("png", photo.read_bytes()), ("txt", photo.stem.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            expected.append((key, photo.read_bytes(), photo.stem.encode()))
    got = [(raw["__key__"], raw["png"], raw["txt"]) for _, raw in iter_shard(str(path), None)]
    assert got == expected


def test_shard_weights_set_each_entrys_draw_rate_and_resume_exactly(emoji_shards):
    """data.shard_weights: one weight per entry of data.shards, each shard of an entry drawn with that weight (the
    LiT recipe draws its emoji pairs more often than its class-captioned ones)."""
    from polymodal.data.errors import SkipCounter
    from polymodal.data.stream import WorkerStream

    shards = [f"{emoji_shards}/0.tar", f"{emoji_shards}/{{1..3}}.tar"]

    def loader(weights, **kw) -> ShardLoader:
        return ShardLoader(DataConfig(shards=shards, shard_weights=weights, resampled=True, image_size=16,
                                      num_workers=0, batch_size=100, shuffle_buffer=200, **kw))

    def first_shard_rate(weights) -> float:
        urls = loader(weights).urls
        stream = WorkerStream(urls, seed=0, epoch=0, worker=0, total_workers=1, resampled=True, shuffle_shards=True,
                              buffer_size=0, buffer_initial=0, counter=SkipCounter(),
                              weights=loader(weights).dataset.weights if weights else None)
        return sum(stream.shard_at(pos) == urls[0] for pos in range(4000)) / 4000

    assert abs(first_shard_rate([3, 1]) - 0.5) < 0.03  # 3 / (3 + 1 + 1 + 1)
    assert abs(first_shard_rate([]) - 0.25) < 0.03
    assert first_shard_rate([0, 1]) == 0.0

    full = [b["__key__"] for _, b in zip(range(8), loader([3, 1]))]
    first = loader([3, 1])
    taken = [b["__key__"] for _, b in zip(range(3), first)]
    rest = loader([3, 1])
    rest.load_state_dict(first.state_dict())
    assert taken + [b["__key__"] for _, b in zip(range(5), rest)] == full
    with pytest.raises(ConfigError, match="shard_weights was"):
        loader([2, 1]).load_state_dict(first.state_dict())

    with pytest.raises(ConfigError, match="2 weights for 1 entries"):
        ShardLoader(DataConfig(shards=str(emoji_shards), shard_weights=[1, 2], resampled=True))
    with pytest.raises(ConfigError, match="not all zero"):
        loader([0, 0])
    with pytest.raises(ConfigError, match="resampled=true"):
        ShardLoader(DataConfig(shards=shards, shard_weights=[3, 1]))
