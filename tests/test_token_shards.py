"""Pre-tokenized shards (`polymodal data tokenize`) read back through the pipeline: token sets joined by key, one
stored crop picked per sample with the pixels following it, bad token arrays counted, `repeats=k` with exact
resume, and a tokenize job killed with SIGKILL resuming to identical bytes. Real CIFAR-10 and emoji shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, export_tokenizer, polymodal_cmd, subprocess_env
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_token_sets_mirror_the_source_and_record_their_tokenizer(tokenized_emoji, emoji_shards):
    root, result = tokenized_emoji
    stats = result["stats"]
    assert stats and stats["failures"] == {}
    for name in ("0.tar", "3.tar"):
        source_keys = sorted({m.split(".", 1)[0] for m in members(emoji_shards / name)})
        for set_name in ("tok_rgb", "tok_caption"):
            got = members(root / "out" / set_name / name)
            assert sorted({m.split(".", 1)[0] for m in got}) == source_keys
    rgb_stats = json.loads((root / "out" / "tok_rgb" / "stats.json").read_text())
    assert rgb_stats["tokens"]["grid"] == [8, 8] and rgb_stats["tokens"]["vocab_size"] == 1000
    assert rgb_stats["tokens"]["dtype"] == "uint16" and rgb_stats["tokens"]["crops"] == 3
    array = np.load(io.BytesIO(members(root / "out" / "tok_rgb" / "0.tar")["000000000.tok_rgb.npy"]))
    assert array.dtype == np.uint16 and array.shape == (3, 8, 8)
    assert len({a.tobytes() for a in array}) > 1  # crops differ


def test_the_pipeline_joins_tokens_and_its_pixels_follow_the_stored_crop(tokenized_emoji, emoji_shards):
    """Re-encoding the rgb the pipeline cut gives exactly the stored tokens: the stored crop's box was applied."""
    from polymodal.tokenizers.registry import load_image_tokenizer
    from polymodal.tokenizers.text import TextTokenizer

    root, _ = tokenized_emoji
    objective, size = load_image_tokenizer(str(root / "fsq"))
    cfg = DataConfig(shards=str(emoji_shards), join=[str(root / "out" / "tok_rgb"), str(root / "out" / "tok_caption")],
                     modalities=["rgb", "tok_rgb", "tok_caption", "caption"], image_size=size, batch_size=32,
                     num_workers=0, shuffle_buffer=0)
    loader = ShardLoader(cfg)
    batch = next(iter(loader))
    assert batch["tok_rgb"].shape == (32, 8, 8) and batch["crops"].shape == (32, 5)
    assert torch.equal(objective.tokenizer_model.encode(objective.inputs(batch)), batch["tok_rgb"])
    vocab = TextTokenizer.load(root / "wp")
    first = batch["tok_caption"][0, : batch["tok_caption_lengths"][0]]
    assert int(first[-1]) == vocab.eos_id
    assert vocab.decode(first[:-1]) == batch["caption"][0].lower()
    assert loader.token_specs["tok_rgb"].fingerprint == objective.tokenizer_model.fingerprint
    # Another epoch picks other crops for some samples, and the same ones when replayed.
    loader.set_epoch(1)
    again = next(iter(loader))
    assert not torch.equal(again["crops"], batch["crops"])
    replay = ShardLoader(cfg)
    replay.set_epoch(1)
    assert torch.equal(next(iter(replay))["crops"], again["crops"])


def test_bad_token_arrays_are_skipped_and_counted(tmp_path):
    """Wrong dtype, wrong grid, ids outside the vocabulary, a sequence that is not 1-D: each skipped, counted."""
    from polymodal.modalities import npy_bytes
    from polymodal.data.writer import ShardFile

    good = np.arange(16, dtype=np.uint16).reshape(1, 4, 4)
    arrays = {"good0": good, "float": good.astype(np.float32), "grid": np.zeros((1, 3, 4), np.uint16),
              "outside": good + 100, "good1": good, "flat": np.zeros(16, np.uint16)}
    shard = ShardFile(tmp_path / "0.tar")
    for key, array in arrays.items():
        shard.add(key, {"tok_rgb.npy": npy_bytes(array)})
    shard.close()
    (tmp_path / "stats.json").write_text(json.dumps({"tokens": {"modality": "tok_rgb", "vocab_size": 100,
                                                                "grid": [4, 4], "crops": 1}}))
    loader = ShardLoader(DataConfig(shards=str(tmp_path), modalities=["tok_rgb"], batch_size=8, num_workers=0,
                                    shuffle_buffer=0))
    batches = list(loader)
    assert [k for b in batches for k in b["__key__"]] == ["good0", "good1"]
    assert loader.skip_counts() == {"bad_tokens": 4}


def test_repeats_hand_out_each_sample_k_times_and_resume_mid_repeat(emoji_shards):
    def loader() -> ShardLoader:
        return ShardLoader(DataConfig(shards=str(emoji_shards), modalities=["rgb"], image_size=16, batch_size=4,
                                      num_workers=1, shuffle_buffer=50, shuffle_initial=10, repeats=3))

    full = [b for _, b in zip(range(9), loader())]
    keys = [k for b in full for k in b["__key__"]]
    assert keys[0::3] == keys[1::3] == keys[2::3]  # each sample three times in a row...
    rgb = torch.cat([b["rgb"] for b in full])
    assert not torch.equal(rgb[0], rgb[1])  # ...each time with fresh augmentation
    first = loader()
    taken = [b for _, b in zip(range(5), first)]  # batch 5 ends in the middle of a sample's repeats
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [b for _, b in zip(range(4), resumed)]
    assert [k for b in taken + rest for k in b["__key__"]] == keys
    assert torch.equal(torch.cat([b["rgb"] for b in taken + rest]), rgb)
    with pytest.raises(ConfigError, match="repeats"):
        other = ShardLoader(DataConfig(shards=str(emoji_shards), modalities=["rgb"], image_size=16, batch_size=4,
                                       num_workers=1, repeats=2))
        other.load_state_dict(first.state_dict())


def test_a_key_missing_from_a_joined_set_is_counted_when_required_and_absent_when_optional(tmp_path, emoji_shards):
    """Drop every third sample from a joined set: required, those samples are skipped as missing_modality;
    optional, they come with <name>_present False."""
    from polymodal.data.writer import ShardFile

    side = tmp_path / "side"
    side.mkdir()
    dropped = set()
    for shard in sorted(emoji_shards.glob("*.tar")):
        out = ShardFile(side / shard.name)
        source = members(shard)
        keys = sorted({m.split(".", 1)[0] for m in source})
        for i, key in enumerate(keys):
            if i % 3 == 0:
                dropped.add(key)
                continue
            out.add(key, {"grey.png": source[f"{key}.png"]})
        out.close()

    def read(**kw):
        loader = ShardLoader(DataConfig(shards=str(emoji_shards), join=[str(side)], image_size=16, batch_size=64,
                                        num_workers=1, shuffle_buffer=0, **kw))
        return loader, list(loader)

    loader, batches = read(modalities=["rgb", "grey"])
    assert not dropped & {k for b in batches for k in b["__key__"]}
    assert loader.skip_counts() == {"missing_modality": len(dropped)}
    loader, batches = read(modalities=["rgb"], optional_modalities=["grey"])
    absent = {k for b in batches for k, here in zip(b["__key__"], b["grey_present"]) if not here}
    assert absent == dropped and loader.skip_counts() == {}
    with pytest.raises(ConfigError, match="data.join"):
        ShardLoader(DataConfig(shards=str(emoji_shards), join=[str(tmp_path / "nowhere")]))


def tokenize_command(source: str, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "tokenize", source, str(out), "--tokenizer", f"rgb={tokenizer}", "--crops", "2", "--workers",
            "1", "-q", *extra]


@pytest.fixture(scope="module")
def cifar_tokenized_whole(tmp_path_factory, cifar_test_shards):
    """Three CIFAR-10 test shards tokenized by one uninterrupted process: the reference output."""
    root = tmp_path_factory.mktemp("cifar-tok")
    tokenizer = export_tokenizer(root / "fsq").parent
    source = f"{cifar_test_shards / 'test'}/{{0..2}}.tar"
    done = subprocess.run(polymodal_cmd() + tokenize_command(source, tokenizer, root / "whole"), cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return source, tokenizer, root / "whole"


def test_tokenize_resumes_after_kill_9_with_identical_bytes(tmp_path, cifar_tokenized_whole):
    source, tokenizer, whole = cifar_tokenized_whole

    def command(*extra: str) -> list[str]:
        return polymodal_cmd() + tokenize_command(source, tokenizer, killed, *extra)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((killed / "_progress").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((killed / "_progress").glob("*.json")))
    assert 1 <= finished < 3, f"the job should be killed part-way, {finished} of 3 shards were done"
    refused = subprocess.run(command(), cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(command("--resume"), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({finished} already done)" in resumed.stdout
    for i in range(3):
        assert (killed / "tok_rgb" / f"{i}.tar").read_bytes() == (whole / "tok_rgb" / f"{i}.tar").read_bytes()
    assert not list(killed.glob("**/*.tmp*"))
    stats = json.loads((killed / "tok_rgb" / "stats.json").read_text())
    assert stats["samples"] == 3000 and stats["tokens"]["fingerprint"].startswith("image:")


def test_tokenize_splits_shards_across_torchrun_ranks(tmp_path, cifar_tokenized_whole):
    """Two ranks (torchrun) take alternate shards and together write what one process writes."""
    source, tokenizer, whole = cifar_tokenized_whole
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "polymodal", *tokenize_command(source, tokenizer, tmp_path / "ranks")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0: tokenized 2000 samples from 2 shards" in done.stdout
    assert "rank 1: tokenized 1000 samples from 1 shards" in done.stdout
    for i in range(3):
        assert (tmp_path / "ranks" / "tok_rgb" / f"{i}.tar").read_bytes() == \
            (whole / "tok_rgb" / f"{i}.tar").read_bytes()
    assert json.loads((tmp_path / "ranks" / "tok_rgb" / "stats.json").read_text())["samples"] == 3000


def test_each_text_modality_has_its_own_tokenizer(tokenized_emoji):
    """A caption through the WordPiece vocabulary, a palette through open_clip's BPE, metadata left as text."""
    import random

    from polymodal.data.pipeline import SampleDecoder
    from polymodal.tokenizers.text import OpenClipBPE, TextTokenizer

    root, _ = tokenized_emoji
    wordpiece, bpe = TextTokenizer.load(root / "wp"), OpenClipBPE()
    decoder = SampleDecoder(DataConfig(modalities=["caption", "palette", "metadata"]),
                            {"caption": wordpiece.encode, "palette": bpe.encode})
    raw = {"__key__": "k", "__url__": "u", "txt": b"grinning face", "palette.txt": b"v1=1 v0=3 v0=4 v0=5",
           "metadata.txt": b"v1=0 v0=7"}
    sample = decoder(raw, random.Random(0))
    assert torch.equal(sample["caption"], wordpiece.encode("grinning face"))
    assert torch.equal(sample["palette"], bpe.encode("v1=1 v0=3 v0=4 v0=5"))
    assert sample["metadata"] == "v1=0 v0=7"


def test_tokenizers_load_by_name_or_path(tokenized_emoji):
    from polymodal import tokenizers
    from polymodal.tokenizers.text import TextTokenizer

    root, _ = tokenized_emoji
    assert {"image", "open_clip_bpe", "wordpiece"} <= set(tokenizers.names())
    wordpiece = tokenizers.load(f"wordpiece:{root / 'wp'}")
    assert wordpiece.fingerprint == tokenizers.load(str(root / "wp")).fingerprint == \
        TextTokenizer.load(root / "wp").fingerprint
    image = tokenizers.load(str(root / "fsq"))
    assert image.grid(32) == (8, 8) and image.fingerprint == tokenizers.load(f"image:{root / 'fsq'}").fingerprint
    assert tokenizers.load("open_clip_bpe:ViT-B-32").vocab_size == 49408
    with pytest.raises(ConfigError, match="not a known kind"):
        tokenizers.load(str(root))
