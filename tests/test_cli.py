"""The command line as a user meets it: help texts, the demo, shards -> inspect -> stream, config errors."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import polymodal_cmd, subprocess_env
from polymodal.cli import main
from polymodal.cli_args import parse_size
from polymodal.config import load_config
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*polymodal_cmd(), *args], capture_output=True, text=True, env=subprocess_env(),
                          check=check, timeout=300)


@pytest.mark.parametrize("command", [[], ["data"], ["data", "shards"], ["data", "inspect"], ["data", "stream"],
                                     ["data", "demo"], ["data", "modalities"], ["data", "derive"],
                                     ["data", "tokenize"], ["tokenizer", "eval"], ["tokenizer", "train-text"]])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: polymodal" in text and len(text.splitlines()) > 4


def test_shards_help_lists_sources_and_options(capsys):
    with pytest.raises(SystemExit):
        main(["data", "shards", "--help"])
    text = capsys.readouterr().out
    for word in (".jsonl", "IDX", ".npz", "--samples-per-shard", "--max-shard-size", "--resize", "--image-format",
                 "--quality", "--workers", "--resume", "example:"):
        assert word in text, word


def test_demo_streams_the_embedded_shards(tmp_path):
    result = run("data", "demo", "--out", str(tmp_path), "--workers", "2")
    assert "samples        1911" in result.stdout and "skipped 0" in result.stdout
    assert (tmp_path / "demo_batch.png").stat().st_size > 10_000


def test_shards_inspect_stream_roundtrip(tmp_path, data_root):
    out = tmp_path / "fmnist"
    result = run("data", "shards", str(data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"), str(out),
                 "--split", "test", "--samples-per-shard", "2500", "--limit", "5000", "-q",
                 "--classnames", "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot")
    assert "wrote 5000 samples in 2 shards" in result.stdout
    assert (out / "test" / "nshards.txt").read_text().strip() == "2"
    inspected = run("data", "inspect", str(out / "test"), "-q")
    assert "samples  5000" in inspected.stdout and ".png" in inspected.stdout and "skipped  0" in inspected.stdout
    state = tmp_path / "state.json"
    streamed = run("data", "stream", str(out / "test"), "modalities=[rgb,label]", "batch_size=500", "image_size=28",
                   "num_workers=2", "--save-state", str(state))
    assert "5000 samples in 10 batches" in streamed.stdout and "rgb (500, 3, 28, 28) uint8" in streamed.stdout
    assert json.loads(state.read_text())["epoch"] == 1


def test_config_errors_are_one_line_naming_the_key(tmp_path):
    result = run("data", "stream", str(tmp_path), "batch_sise=3", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "batch_sise" in result.stderr
    result = run("data", "stream", str(tmp_path), "batch_size=many", check=False)
    assert result.returncode == 2 and "batch_size" in result.stderr


def test_config_file_and_overrides(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  shards: ['a/{0..3}.tar']\n  batch_size: 32\n  modalities: [rgb, label]\n")
    cfg = load_config(DataConfig, config, ["batch_size=8", "crop_scale=[0.5,1.0]"], section="data")
    assert cfg.batch_size == 8 and cfg.modalities == ["rgb", "label"] and cfg.crop_scale == [0.5, 1.0]
    with pytest.raises(ConfigError, match="resampeld"):
        load_config(DataConfig, None, ["resampeld=true"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DataConfig, None, ["resampled"])
    config.write_text("data:\n  shards: [a/{0..3}.tar]\n")
    with pytest.raises(ConfigError, match=f"config {config}: not valid YAML"):
        load_config(DataConfig, config, section="data")
    with pytest.raises(ConfigError, match="override 'shards=.*quote"):  # the override is named, not the file
        load_config(DataConfig, None, ["shards=[a/{0..2}.tar,b.tar]"])
    cfg = load_config(DataConfig, None, ['shards=["a/{0..2}.tar","b.tar"]'])
    assert cfg.shards == ["a/{0..2}.tar", "b.tar"]


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 1 << 30 and parse_size("123") == 123
    with pytest.raises(Exception):
        parse_size("lots")


def test_stream_takes_shards_from_config_string_or_override(tmp_path, emoji_shards):
    config = tmp_path / "exp.yaml"
    config.write_text(f"data:\n  shards: '{emoji_shards}/{{0..3}}.tar'\n  image_size: 16\n  num_workers: 0\n")
    from_file = run("data", "stream", "--config", str(config))
    from_override = run("data", "stream", f"shards={emoji_shards}", "image_size=16", "num_workers=0")
    for result in (from_file, from_override):
        assert "1911 samples in 30 batches" in result.stdout and "skipped 0" in result.stdout
