"""Bad input never kills a run; only configuration errors stop the program.

Every case is a real broken file built in tmp_path from real images of the shared data folder (no mocks):
truncated tars, zero-byte / corrupt / oversized images, non-UTF-8 captions, samples missing a modality,
repeated keys, empty and missing shards, members that could carry pickled code, and `pipe:` URLs. For each,
the run must complete, the good samples must all arrive, and the skip must be counted under its reason in
`ShardLoader.skip_counts()`, in the loader's state (the run's stats) and in the log / CLI output.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polymodal.data.config import DataConfig
from polymodal.data.errors import REASONS, ConfigError, SkipCounter, summarize
from polymodal.data.inspect_shards import inspect_shards
from polymodal.data.pipeline import ShardLoader
from polymodal.data.tar_samples import iter_shard

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMOJI = DATA / "emoji" / "img64"
IMAGENET = DATA / "imagenet-samples"

if not (EMOJI.is_dir() and IMAGENET.is_dir()):
    pytest.fail(f"real test images not found under {DATA} (expected ../shared/data beside the repo)", pytrace=False)

PNGS = [p.read_bytes() for p in sorted(EMOJI.glob("*.png"))[:12]]
JPGS = [p.read_bytes() for p in sorted(IMAGENET.glob("*.JPEG"))[:3]]
assert len(PNGS) == 12 and len(JPGS) == 3


# ---------------------------------------------------------------------------------------------------------------
# Building shards


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with the members in this order (duplicates allowed), the webdataset `key.ext` way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def member_offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {info.name: info for info in tar.getmembers()}


def sample(key: str, image: bytes | None = None, ext: str = "png", caption: bytes | None = None):
    """Members of one sample: an image (if given) and a caption (default: a valid one)."""
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    members.append((f"{key}.txt", caption if caption is not None else f"an emoji, sample {key}".encode()))
    return members


def good(prefix: str, n: int, start: int = 0, jpeg: bool = False) -> tuple[list, list[str]]:
    """n valid samples (real PNGs, or real JPEGs) and their keys."""
    members, keys = [], []
    for i in range(start, start + n):
        key = f"{prefix}{i:03d}"
        image, ext = (JPGS[i % len(JPGS)], "jpg") if jpeg else (PNGS[i % len(PNGS)], "png")
        members += sample(key, image, ext)
        keys.append(key)
    return members, keys


def garbage(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class UnpickleProbe:
    """Pickles to a call of open(path, 'w'): unpickling it creates `path`, so its absence proves no unpickling."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------------------------
# Running the pipeline


def run_loader(shards, caplog=None, **overrides) -> tuple[list[str], ShardLoader, list[dict]]:
    """Iterate one full epoch; returns (keys in arrival order, loader, batches)."""
    settings = dict(modalities=["rgb", "caption"], image_size=32, num_workers=0, batch_size=4,
                    shuffle_buffer=8, shuffle_initial=2)
    settings.update(overrides)
    cfg = DataConfig(shards=[str(s) for s in shards], **settings)
    if caplog is not None:
        caplog.set_level(logging.WARNING, logger="polymodal.data")
    loader = ShardLoader(cfg)
    batches = list(loader)
    keys = [key for batch in batches for key in batch["__key__"]]
    for batch in batches:
        assert tuple(batch["rgb"].shape[1:]) == (3, 32, 32)
        assert len(batch["caption"]) == len(batch["__key__"])
    return keys, loader, batches


def summary_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("data (rank")]


def assert_counted(loader: ShardLoader, caplog, expected: dict[str, int]) -> None:
    """Exact counts in skip_counts() and in the saved state; each reason in the log."""
    assert set(expected) <= set(REASONS)
    assert loader.skip_counts() == expected
    assert loader.state_dict()["skips_before_epoch"] == expected
    if caplog is None:
        return
    for reason in expected:
        assert f"skipped ({reason})" in caplog.text, f"no first-occurrence warning for {reason}"
    summaries = summary_lines(caplog)
    assert summaries, "no 'data (rank N): skipped ...' summary in the log"
    for reason in expected:
        assert any(f"{reason}=" in line for line in summaries), (reason, summaries)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polymodal", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Truncated tars


def test_truncated_tar_keeps_samples_before_the_cut_and_continues(tmp_path, caplog):
    members, keys = good("a", 6)
    full = write_tar(tmp_path / "full.tar", members)
    cut_at = member_offsets(full)["a003.txt"]
    data = full.read_bytes()
    cut = tmp_path / "0.tar"
    cut.write_bytes(data[: cut_at.offset_data + cut_at.size // 2])  # in the middle of a003's caption
    after, after_keys = good("b", 3)
    write_tar(tmp_path / "1.tar", after)
    full.unlink()

    got, loader, _ = run_loader([tmp_path / "0.tar", tmp_path / "1.tar"], caplog, shuffle_shards=False)

    assert sorted(got) == keys[:3] + after_keys  # a000..a002 before the cut, and the next shard in full
    assert_counted(loader, caplog, {"truncated_shard": 1})


def test_truncated_gzip_shard(tmp_path, caplog):
    members, keys = good("z", 6)
    plain = write_tar(tmp_path / "plain.tar", members)
    packed = gzip.compress(plain.read_bytes(), mtime=0)
    (tmp_path / "0.tar.gz").write_bytes(packed[: len(packed) * 3 // 4])
    plain.unlink()
    got, loader, _ = run_loader([tmp_path / "0.tar.gz"], caplog)
    assert set(got) < set(keys) and len(got) == len(set(got))
    assert_counted(loader, caplog, {"truncated_shard": 1})


def test_truncated_in_first_member_of_a_sample_keeps_previous_sample(tmp_path, caplog):
    members, keys = good("a", 6)
    full = write_tar(tmp_path / "full.tar", members)
    cut_at = member_offsets(full)["a003.png"]
    (tmp_path / "0.tar").write_bytes(full.read_bytes()[: cut_at.offset_data + cut_at.size // 2])
    full.unlink()
    got, loader, _ = run_loader([tmp_path / "0.tar"], caplog)
    assert loader.skip_counts() == {"truncated_shard": 1}
    assert sorted(got) == keys[:3]


@pytest.mark.parametrize("where", ["mid_header", "at_header"])
def test_truncated_in_a_header_is_counted(tmp_path, caplog, where):
    members, keys = good("a", 6)
    full = write_tar(tmp_path / "full.tar", members)
    header = member_offsets(full)["a003.png"].offset
    end = header + 100 if where == "mid_header" else header
    (tmp_path / "0.tar").write_bytes(full.read_bytes()[:end])
    full.unlink()
    got, loader, _ = run_loader([tmp_path / "0.tar"], caplog)
    # a002's members are all whole: the cut before a003's first member must not lose it
    assert sorted(got) == keys[:3]
    assert loader.skip_counts() == {"truncated_shard": 1}


def test_shard_that_is_not_a_tar_is_counted(tmp_path, caplog):
    (tmp_path / "0.tar").write_bytes(garbage(20_000, seed=7))
    members, keys = good("g", 3)
    write_tar(tmp_path / "1.tar", members)
    got, loader, _ = run_loader([tmp_path / "0.tar", tmp_path / "1.tar"], caplog)
    assert sorted(got) == keys
    assert_counted(loader, caplog, {"corrupt_shard": 1})


# ---------------------------------------------------------------------------------------------------------------
# Bad samples inside an otherwise good shard


def _bomb_png() -> bytes:
    """A real 20000x20000 bilevel PNG: 400 megapixels, about 50 KB compressed."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    data = _bomb_png()
    assert len(data) < 200_000
    return data


BAD_SAMPLES = {
    # name: (members of the bad sample(s), expected counts)
    "zero_byte_image": (lambda ctx: sample("bad", b""), {"empty_member": 1}),
    "garbage_image": (lambda ctx: sample("bad", garbage(4000, seed=1), "jpg"), {"corrupt_image": 1}),
    "jpeg_header_then_garbage": (lambda ctx: sample("bad", JPGS[0][:20] + garbage(5000, seed=2), "jpg"),
                                 {"corrupt_image": 1}),
    "truncated_jpeg": (lambda ctx: sample("bad", JPGS[0][: len(JPGS[0]) // 2], "jpg"), {"corrupt_image": 1}),
    "jpeg_with_garbage_tail": (lambda ctx: sample("bad", JPGS[1][: len(JPGS[1]) // 2] +
                                                  garbage(len(JPGS[1]) // 2, seed=3), "jpg"),
                               {"corrupt_image": 1}),
    "truncated_png": (lambda ctx: sample("bad", PNGS[0][: len(PNGS[0]) // 2]), {"corrupt_image": 1}),
    "caption_not_utf8": (lambda ctx: sample("bad", PNGS[1], caption=b"\xff\xfe\xfa"), {"bad_text": 1}),
    "missing_caption": (lambda ctx: [("bad.png", PNGS[2])], {"missing_modality": 1}),
    "missing_image": (lambda ctx: sample("bad"), {"missing_modality": 1}),
    "decompression_bomb": (lambda ctx: sample("bad", ctx["bomb"]), {"image_too_large": 1}),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_is_skipped_and_counted(tmp_path, caplog, request, case):
    build, expected = BAD_SAMPLES[case]
    ctx = {"bomb": request.getfixturevalue("bomb_png") if case == "decompression_bomb" else None}
    before, keys_before = good("g", 3)
    after, keys_after = good("g", 3, start=3, jpeg=True)  # JPEGs too: the reduced-scale decode path
    write_tar(tmp_path / "0.tar", before + build(ctx) + after)

    got, loader, _ = run_loader([tmp_path / "0.tar"], caplog)

    assert sorted(got) == keys_before + keys_after
    assert_counted(loader, caplog, expected)


def test_lower_max_image_pixels(tmp_path, caplog):
    small, small_keys = good("p", 4)  # 64x64 emoji = 4096 pixels
    large, large_keys = good("j", 3, jpeg=True)  # ImageNet photos, a few hundred pixels a side
    write_tar(tmp_path / "0.tar", small + large)

    got, loader, _ = run_loader([tmp_path / "0.tar"])
    assert sorted(got) == sorted(small_keys + large_keys) and loader.skip_counts() == {}

    got, loader, _ = run_loader([tmp_path / "0.tar"], caplog, max_image_pixels=64 * 64)
    assert sorted(got) == small_keys
    assert_counted(loader, caplog, {"image_too_large": 3})


def test_repeated_keys(tmp_path, caplog):
    members = []
    members += sample("k0", PNGS[0])
    members += sample("k1", PNGS[1], caption=b"first k1")
    members += sample("k2", PNGS[2])
    members += sample("k1", PNGS[3], caption=b"second k1")  # same key again, not consecutive
    members += [("k3.png", PNGS[4]), ("k3.png", PNGS[5]), ("k3.txt", b"k3")]  # same key.ext twice in a row
    members += sample("k4", PNGS[6])
    members += sample("k0", PNGS[7], caption=b"second k0")  # and once more at the end of the shard
    write_tar(tmp_path / "0.tar", members)

    got, loader, batches = run_loader([tmp_path / "0.tar"], caplog)

    assert sorted(got) == ["k0", "k1", "k2", "k4"]
    captions = {k: c for b in batches for k, c in zip(b["__key__"], b["caption"])}
    assert captions["k1"] == "first k1" and captions["k0"] == "an emoji, sample k0"
    assert_counted(loader, caplog, {"duplicate_key": 3})


def test_empty_shards(tmp_path, caplog):
    members, keys = good("g", 4)
    write_tar(tmp_path / "0.tar", members)
    write_tar(tmp_path / "1.tar", [])  # a valid tar without members
    (tmp_path / "2.tar").write_bytes(b"")  # zero bytes
    assert (tmp_path / "1.tar").stat().st_size > 0

    for spec in ([tmp_path / "0.tar", tmp_path / "1.tar", tmp_path / "2.tar"], [tmp_path]):
        caplog.clear()
        got, loader, _ = run_loader(spec, caplog)
        assert sorted(got) == keys
        assert_counted(loader, caplog, {"empty_shard": 2})


def test_missing_shard_listed_with_good_ones(tmp_path, caplog):
    first, first_keys = good("a", 3)
    last, last_keys = good("c", 3)
    write_tar(tmp_path / "0.tar", first)
    write_tar(tmp_path / "2.tar", last)

    got, loader, _ = run_loader([str(tmp_path / "{0..2}.tar")], caplog)  # 1.tar does not exist
    assert sorted(got) == first_keys + last_keys
    assert_counted(loader, caplog, {"missing_shard": 1})
    assert "do not exist" in caplog.text and "1.tar" in caplog.text

    spec = "::".join(str(tmp_path / name) for name in ("0.tar", "gone.tar", "2.tar", "also-gone.tar"))
    got, loader, _ = run_loader([spec], caplog)
    assert sorted(got) == first_keys + last_keys
    assert_counted(loader, caplog, {"missing_shard": 2})


# ---------------------------------------------------------------------------------------------------------------
# Security: nothing in a shard is ever unpickled; pipe: needs an explicit opt-in


def test_pickle_members_are_rejected_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(UnpickleProbe(marker))
    # The probe works: unpickling a twin of the payload does create its file.
    twin = tmp_path / "probe-works"
    pickle.loads(pickle.dumps(UnpickleProbe(twin)))
    assert twin.exists()

    members = []
    members += sample("g000", PNGS[0]) + [("g000.pth", payload)]  # inside a good sample
    members += [("g001.pickle", payload)] + sample("g001", PNGS[1])  # first member of a sample
    members += sample("g002", PNGS[2]) + [("g002.PYD", payload)]
    members += [("evil.pkl", payload), ("evil.pt", payload), ("evil.ckpt", payload)]  # a sample of nothing else
    members += sample("g003", PNGS[3]) + [("g003.model.pth", payload)]
    write_tar(tmp_path / "0.tar", members)

    got, loader, _ = run_loader([tmp_path / "0.tar"], caplog, optional_modalities=["array", "label"])
    assert sorted(got) == ["g000", "g001", "g002", "g003"]
    assert_counted(loader, caplog, {"forbidden_member": 7})

    raws = [raw for _, raw in iter_shard(str(tmp_path / "0.tar"), SkipCounter())]
    assert [r["__key__"] for r in raws] == ["g000", "g001", "g002", "g003"]
    assert all(set(r) == {"__key__", "__url__", "png", "txt"} for r in raws)

    report = inspect_shards(str(tmp_path / "0.tar"), show_progress=False)
    assert report.skips == {"forbidden_member": 7} and report.samples == 4
    assert not marker.exists()


def test_pickled_npy_is_not_loaded(tmp_path, caplog):
    marker = tmp_path / "UNPICKLED"
    buf = io.BytesIO()
    np.save(buf, np.array([UnpickleProbe(marker)], dtype=object), allow_pickle=True)
    members, keys = good("g", 3)
    write_tar(tmp_path / "0.tar", members + sample("bad", PNGS[4]) + [("bad.npy", buf.getvalue())])

    got, loader, _ = run_loader([tmp_path / "0.tar"], caplog, optional_modalities=["array"])
    assert sorted(got) == keys
    assert_counted(loader, caplog, {"bad_array": 1})
    assert not marker.exists()


def test_pipe_urls_refused_unless_allowed(tmp_path, caplog):
    members, keys = good("g", 4)
    shard = write_tar(tmp_path / "0.tar", members + sample("bad", PNGS[5], caption=b"\xff\xfe\xfa"))
    marker = tmp_path / "COMMAND-RAN"
    hostile = f"pipe:touch {marker}; cat {shard}"

    for spec in ([hostile], [f"{shard}::{hostile}"], [str(shard), f"pipe:cat {shard}"]):
        with pytest.raises(ConfigError, match="allow_pipe"):
            ShardLoader(DataConfig(shards=spec, num_workers=0))
    with pytest.raises(ConfigError, match="allow_pipe"):
        inspect_shards(hostile, show_progress=False)
    assert not marker.exists()

    got, loader, _ = run_loader([f"pipe:cat {shard}"], caplog, allow_pipe=True)
    assert sorted(got) == keys
    assert_counted(loader, caplog, {"bad_text": 1})


# ---------------------------------------------------------------------------------------------------------------
# Configuration errors stop the program


def test_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    members, _ = good("g", 2)
    shard = write_tar(tmp_path / "0.tar", members)
    cases = [
        dict(shards=[str(tmp_path / "empty")]),
        dict(shards=[str(tmp_path / "nothing-here" / "*.tar")]),
        dict(shards=[str(tmp_path / "*.tgz")]),
        dict(shards=[str(tmp_path / "gone-{0..3}.tar")]),  # listed, but none exists
        dict(shards=[str(shard)], modalities=["rgb", "smell"]),
        dict(shards=[str(shard)], modalities=["rgb"], optional_modalities=["smell"]),
    ]
    for case in cases:
        with pytest.raises(ConfigError):
            ShardLoader(DataConfig(num_workers=0, **case))


@pytest.mark.parametrize("case", ["empty_folder", "no_glob_match", "unknown_modality", "pipe_refused"])
def test_cli_config_error_is_one_line_and_exit_2(tmp_path, case):
    (tmp_path / "empty").mkdir()
    members, _ = good("g", 2)
    shard = write_tar(tmp_path / "0.tar", members)
    args = {
        "empty_folder": [str(tmp_path / "empty")],
        "no_glob_match": [str(tmp_path / "nothing" / "*.tar")],
        "unknown_modality": [str(shard), "modalities=[rgb,smell]"],
        "pipe_refused": [f"pipe:cat {shard}"],
    }[case]
    proc = cli("data", "stream", *args, "image_size=32", "num_workers=0")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("polymodal: error:"), lines[0]
    assert {"empty_folder": "no shards match", "no_glob_match": "no shards match",
            "unknown_modality": "unknown modality 'smell'", "pipe_refused": "allow_pipe"}[case] in lines[0]
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------------
# Many kinds of bad input at once: worker processes, the CLI, inspect


def build_mixed(root: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """Six shards, one missing, with one skip of each kind; returns (spec, good keys, expected counts)."""
    keys = []
    m, k = good("a", 4)
    keys += k
    write_tar(root / "0.tar", m[:4] + sample("a_text", PNGS[1], caption=b"\xff\xfe\xfa") + m[4:]
              + sample("a_empty", b""))
    m, k = good("b", 4, jpeg=True)
    keys += k
    write_tar(root / "1.tar", m + sample("b_garbage", garbage(3000, seed=5), "jpg") + sample("b001", PNGS[2]))
    m, k = good("c", 5)
    full = write_tar(root / "full.tar", m)
    info = member_offsets(full)["c003.txt"]
    (root / "2.tar").write_bytes(full.read_bytes()[: info.offset_data + 2])
    full.unlink()
    keys += k[:3]
    write_tar(root / "3.tar", [])
    m, k = good("d", 2)
    keys += k
    write_tar(root / "5.tar", m + [("d001.pth", pickle.dumps(UnpickleProbe(root / "UNPICKLED")))]
              + [("d_nocap.png", PNGS[3])])
    spec = [str(root / f"{i}.tar") for i in range(6)]  # 4.tar is missing
    expected = {"bad_text": 1, "empty_member": 1, "corrupt_image": 1, "duplicate_key": 1, "truncated_shard": 1,
                "empty_shard": 1, "missing_shard": 1, "forbidden_member": 1, "missing_modality": 1}
    return spec, sorted(keys), expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_bad_input_counts_aggregate_across_workers(tmp_path, caplog, num_workers):
    spec, keys, expected = build_mixed(tmp_path)
    got, loader, _ = run_loader(spec, caplog, num_workers=num_workers, batch_size=3)
    assert loader.num_workers == num_workers
    assert sorted(got) == keys
    if num_workers:
        # worker processes log their own first-occurrence lines; the main process logs the totals
        assert_counted(loader, None, expected)
        summaries = summary_lines(caplog)
        assert summaries and all(any(f"{r}=" in s for s in summaries) for r in expected), summaries
    else:
        assert_counted(loader, caplog, expected)
    assert not (tmp_path / "UNPICKLED").exists()


def test_cli_stream_reports_skips(tmp_path):
    spec, keys, expected = build_mixed(tmp_path / "shards")
    state = tmp_path / "state.json"
    proc = cli("data", "stream", "::".join(spec), "modalities=[rgb,caption]", "image_size=32", "num_workers=2",
               "batch_size=4", "--save-state", str(state))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    final = [line for line in proc.stdout.splitlines() if " samples in " in line]
    assert len(final) == 1, proc.stdout
    assert final[0].startswith(f"{len(keys)} samples in ")
    assert final[0].endswith(summarize(expected)), final[0]
    assert summarize(expected) == "skipped 9 (bad_text=1, corrupt_image=1, duplicate_key=1, empty_member=1, " \
                                  "empty_shard=1, forbidden_member=1, missing_modality=1, missing_shard=1, " \
                                  "truncated_shard=1)"
    assert json.loads(state.read_text())["skips_before_epoch"] == expected
    for reason in expected:  # first occurrence of each reason, logged by the worker that met it
        assert f"skipped ({reason})" in proc.stderr, reason
    assert not (tmp_path / "shards" / "UNPICKLED").exists()


def test_cli_inspect_reports_skips(tmp_path):
    spec, keys, expected = build_mixed(tmp_path / "shards")
    proc = cli("data", "inspect", "::".join(spec), "-q")
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1, proc.stdout
    # inspect has no notion of required modalities: the caption-less sample is a sample, not a skip
    want = {k: v for k, v in expected.items() if k != "missing_modality"}
    match = re.fullmatch(r"skipped\s+(\d+)\s+(\{.*\})", skipped[0])
    assert match, skipped[0]
    assert int(match.group(1)) == sum(want.values())
    assert json.loads(match.group(2)) == want
    assert re.search(rf"^samples\s+{len(keys) + 1}$", proc.stdout, re.M), proc.stdout
    for reason in want:
        assert f"skipped ({reason})" in proc.stderr, reason


def test_inspect_counts_truncated_jpeg(tmp_path):
    members, _ = good("g", 2, jpeg=True)
    write_tar(tmp_path / "0.tar", members + sample("bad", JPGS[0][: len(JPGS[0]) // 2], "jpg"))
    report = inspect_shards(str(tmp_path / "0.tar"), show_progress=False)
    assert report.skips == {"corrupt_image": 1}
    assert report.samples == 2


def test_log_summary_counts_are_exact(tmp_path, caplog):
    members, _ = good("g", 3)
    write_tar(tmp_path / "0.tar", members + sample("bad", PNGS[4], caption=b"\xff\xfe\xfa"))
    _, loader, _ = run_loader([tmp_path / "0.tar", tmp_path / "missing.tar"], caplog)
    assert loader.skip_counts() == {"bad_text": 1, "missing_shard": 1}
    summaries = summary_lines(caplog)
    assert summaries[-1] == "data (rank 0): skipped 2 (bad_text=1, missing_shard=1)", summaries
