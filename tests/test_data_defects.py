"""Issue 14's data defects, each on real shards written from ../shared/data and read by the real pipeline.

11: a shard cut inside a later sample keeps every sample whose members are whole.
12: resampled mode on data with no usable sample stops with a clear error instead of spinning forever.
13: `polymodal data shards` that can write nothing fails and says why.
14: a list- or dict-typed config key given a scalar says what it expects and how to write it.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from polymodal.config import load_config
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError, SkipCounter
from polymodal.data.pipeline import ShardLoader
from polymodal.data.sources import SourceOptions, open_source
from polymodal.data.stream import WorkerStream
from polymodal.data.writer import WriterOptions, write_shards

DEMO_SHARDS = REPO / "polymodal" / "demo_data" / "train"  # rgb + caption, no label


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`polymodal ARGS` in a subprocess; the timeout turns a hang into a failure."""
    return subprocess.run([sys.executable, "-m", "polymodal", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env())


def emoji_table(root: Path, data_root: Path, n: int, image=lambda row: row["image"]) -> Path:
    """The first `n` rows of the emoji captions as a jsonl table in `root` (images copied beside it)."""
    rows = [json.loads(line) for line in (data_root / "emoji" / "captions.jsonl").read_text().splitlines()[:n]]
    for row in rows:
        (root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / "emoji" / row["image"], root / row["image"])
    table = root / "table.jsonl"
    table.write_text("".join(json.dumps({**row, "image": image(row)}) + "\n" for row in rows))
    return table


# ---------------------------------------------------------------------------------------------------------------
# 11. Truncated shards keep every complete sample


@pytest.fixture(scope="module")
def twelve_samples(tmp_path_factory, data_root) -> Path:
    """One real shard of 12 emoji samples, 3 members each (json, png, txt), written by polymodal's writer."""
    out = tmp_path_factory.mktemp("twelve")
    source = open_source(str(data_root / "emoji" / "captions.jsonl"), SourceOptions(caption="{name}", limit=12))
    write_shards(source, out, WriterOptions(samples_per_shard=12), show_progress=False)
    return out / "0.tar"


def cut_offset(shard: Path, where: str) -> int:
    """A byte offset inside the 7th sample (key 000000006), or just after the 6th one's data."""
    with tarfile.open(shard) as tar:
        info = {m.name: m for m in tar.getmembers()}
    first, image, last_of_6th = info["000000006.json"], info["000000006.png"], info["000000005.txt"]
    assert last_of_6th.size % 512, "the 6th sample's caption must end inside a block to leave padding to cut"
    return {
        "first_header_of_7th": first.offset + 100,  # the name is there, the rest of the header is not
        "at_7th": first.offset,  # exactly at a block boundary, before the 7th sample's first header
        "padding_after_6th": last_of_6th.offset_data + last_of_6th.size + 7,  # the 6th's data whole
        "image_of_7th": image.offset_data + image.size // 2,
    }[where]


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("where", ["first_header_of_7th", "at_7th", "padding_after_6th", "image_of_7th"])
def test_truncated_shard_keeps_every_complete_sample(tmp_path, twelve_samples, where, compressed):
    cut = twelve_samples.read_bytes()[: cut_offset(twelve_samples, where)]
    shard = tmp_path / ("0.tar.gz" if compressed else "0.tar")
    shard.write_bytes(gzip.compress(cut, mtime=0)[:-8] if compressed else cut)  # .gz: its end cut off too
    loader = ShardLoader(DataConfig(shards=[str(shard)], modalities=["rgb", "caption"], image_size=16,
                                    num_workers=0, batch_size=4, shuffle_buffer=0))
    keys = [key for batch in loader for key in batch["__key__"]]
    assert keys == [f"{i:09d}" for i in range(6)]
    assert loader.skip_counts() == {"truncated_shard": 1}


def test_cli_stream_keeps_every_complete_sample_of_a_cut_shard(tmp_path, twelve_samples):
    cut = twelve_samples.read_bytes()[: cut_offset(twelve_samples, "first_header_of_7th")]
    (tmp_path / "0.tar").write_bytes(cut)
    proc = cli("data", "stream", str(tmp_path / "0.tar"), "modalities=[rgb,caption]", "image_size=16",
               "num_workers=0", "batch_size=4", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "6 samples in 2 batches" in proc.stdout and "truncated_shard=1" in proc.stdout, proc.stdout


@pytest.mark.parametrize("where", ["first_header_of_7th", "image_of_7th"])
def test_resume_anywhere_around_a_cut_counts_it_once(tmp_path, twelve_samples, where):
    """The kept 6th sample goes out before the cut is counted: a position saved between them replays the count."""
    (tmp_path / "0.tar").write_bytes(twelve_samples.read_bytes()[: cut_offset(twelve_samples, where)])
    shutil.copy(twelve_samples, tmp_path / "1.tar")

    def stream(counter: SkipCounter) -> WorkerStream:
        return WorkerStream([str(tmp_path / "0.tar"), str(tmp_path / "1.tar")], seed=0, epoch=0, worker=0,
                            total_workers=1, resampled=False, shuffle_shards=False, buffer_size=4, buffer_initial=2,
                            counter=counter)

    counter = SkipCounter()
    full = [(pos, idx) for pos, idx, _ in stream(counter)]
    assert len(full) == 6 + 12 and counter.as_dict() == {"truncated_shard": 1}
    for stop in range(len(full)):
        first_counter = SkipCounter()
        first = stream(first_counter)
        taken = [(pos, idx) for _, (pos, idx, _) in zip(range(stop), first)]  # range first: takes no extra
        resumed_counter = SkipCounter()
        resumed_counter.load(first_counter.as_dict())
        resumed = stream(resumed_counter)
        resumed.restore(first.state())
        assert taken + [(pos, idx) for pos, idx, _ in resumed] == full
        assert resumed_counter.as_dict() == {"truncated_shard": 1}, stop


# ---------------------------------------------------------------------------------------------------------------
# 12. Resampled mode with no usable sample stops


class Hang(BaseException):
    """Not an Exception: the pipeline counts any Exception raised while decoding a sample as a skip."""


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts the main process's wait (workers run in other processes)."""

    def fail(*_):
        raise Hang(f"no result within {seconds} s: the stream hangs")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def resampled(shards: list[str], num_workers: int, **overrides) -> ShardLoader:
    settings = dict(modalities=["rgb", "label"], image_size=16, batch_size=8, num_workers=num_workers,
                    resampled=True, shuffle_buffer=50, shuffle_initial=10)
    return ShardLoader(DataConfig(shards=shards, **{**settings, **overrides}))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_without_usable_samples_stops_with_the_skip_counts(num_workers):
    with deadline(60), pytest.raises(ConfigError) as caught:
        next(iter(resampled([str(DEMO_SHARDS)], num_workers)))
    message = str(caught.value)
    assert "no usable sample" in message and "missing_modality=" in message, message
    assert "Traceback" not in message  # raised afresh in the main process, not torch's worker re-raise


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_on_empty_shards_stops(tmp_path, num_workers):
    for i in range(2):
        tarfile.open(tmp_path / f"{i}.tar", "w").close()
    with deadline(60), pytest.raises(ConfigError, match=r"empty_shard=\d+"):
        next(iter(resampled([str(tmp_path)], num_workers)))


def test_resampled_with_some_unusable_shards_keeps_going(tmp_path, data_root):
    """A labelled shard among the caption-only demo shards: batches keep coming, no error."""
    source = open_source(str(data_root / "mnist10k" / "mnist10k_npm.npz"), SourceOptions(limit=40))
    write_shards(source, tmp_path, WriterOptions(samples_per_shard=40), show_progress=False)
    loader = resampled([str(DEMO_SHARDS), str(tmp_path / "0.tar")], 0)
    batches = 0
    with deadline(120):
        for batch in loader:
            assert batch["label"].shape == (8,)
            batches += 1
            if batches == 60:
                break
    assert loader.skip_counts()["missing_modality"] > 0


def test_cli_stream_resampled_without_usable_samples_exits_2():
    proc = cli("data", "stream", str(DEMO_SHARDS), "modalities=[rgb,label]", "resampled=true", "num_workers=2",
               "image_size=16", "-q", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("polymodal: error:")]
    assert len(error) == 1 and "missing_modality=" in error[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# 13. A conversion that writes nothing fails


def test_shards_from_a_table_of_unreadable_paths_fails(tmp_path, data_root):
    table = emoji_table(tmp_path, data_root, 5, image=lambda row: "gone/" + row["image"])
    source = open_source(str(table), SourceOptions(caption="{name}"))
    with pytest.raises(ConfigError, match="unreadable_source"):
        write_shards(source, tmp_path / "direct", WriterOptions(), show_progress=False)

    proc = cli("data", "shards", str(table), str(tmp_path / "out"), "--caption", "{name}", "-q")
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("polymodal: error:"), proc.stderr
    for part in ("unreadable_source=5", "'image'", "--image-field"):
        assert part in error, error


def test_shards_from_a_good_table_still_work(tmp_path, data_root):
    table = emoji_table(tmp_path, data_root, 5)
    proc = cli("data", "shards", str(table), str(tmp_path / "out"), "--caption", "{name}", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote 5 samples in 1 shards"), proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# 14. Override errors say what the key expects


@dataclass
class WithMapping:
    extra: dict[str, int] = field(default_factory=dict)


@pytest.mark.parametrize("override, expected", [
    ("modalities=rgb,caption", "config key 'modalities': expects a list; write it as modalities=[rgb,caption]"),
    ("crop_scale=0.5", "config key 'crop_scale': expects a list; write it as crop_scale=[0.5]"),
    ("modalities={rgb: 1}", "config key 'modalities': expects a list; write it as modalities=[...]"),
])
def test_list_key_given_a_scalar(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(DataConfig, overrides=[override])
    assert str(caught.value) == expected


@pytest.mark.parametrize("override", ["extra=3", "extra=[1,2]"])
def test_dict_key_given_a_scalar(override):
    with pytest.raises(ConfigError) as caught:
        load_config(WithMapping, overrides=[override])
    assert str(caught.value) == ("config key 'extra': expects a mapping; write it as extra={name: value} "
                                 "or extra.name=value")


def test_list_key_given_a_scalar_in_a_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  modalities: rgb\n")
    with pytest.raises(ConfigError, match=r"config key 'modalities': expects a list; write it as "
                                          r"modalities: \[\.\.\.\]"):
        load_config(DataConfig, tmp_path / "c.yaml", section="data")


def test_cli_override_errors_name_the_form():
    proc = cli("data", "stream", str(DEMO_SHARDS), "modalities=rgb,caption", "num_workers=0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("polymodal: error: config key 'modalities': expects a list; write it as "
                                   "modalities=[rgb,caption]")
    proc = cli("pretrain", str(REPO / "configs" / "demo.yaml"), "deepspeed=3")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("polymodal: error: config key 'deepspeed': expects a mapping; "
                                                    "write it as deepspeed={name: value} or deepspeed.name=value")
