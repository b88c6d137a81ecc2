"""The launch/ scripts start real 2-process CPU runs of `polymodal pretrain` (DeepSpeed launcher, torchrun,
accelerate with a DeepSpeed ZeRO-3 config file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, subprocess_env

CONFIG = str(REPO / "configs" / "engine-cifar10.yaml")


def launch_env(**extra) -> dict:
    env = subprocess_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env["DS_ACCELERATOR"] = "cpu"
    env.update(extra)
    return env


def overrides(shards: Path, run_dir: Path) -> list[str]:
    return [f"data.shards={shards / 'test'}", f"run_dir={run_dir}", "steps=3", "checkpoint.every=0",
            "log.progress=false", "data.num_workers=1"]


def start_event(run_dir: Path) -> dict:
    return json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_torchrun_script(cifar_test_shards, tmp_path):
    run(["bash", "launch/torchrun.sh", CONFIG, *overrides(cifar_test_shards, tmp_path)], launch_env(NPROC="2"))
    start = start_event(tmp_path)
    assert start["launcher"] == "torchrun" and start["world_size"] == 2
    assert (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE.json").is_file()


def test_deepspeed_launcher_script(cifar_test_shards, tmp_path):
    run(["bash", "launch/deepspeed.sh", CONFIG, *overrides(cifar_test_shards, tmp_path)], launch_env(NUM_GPUS="2"))
    start = start_event(tmp_path)
    assert start["launcher"] == "deepspeed" and start["world_size"] == 2


def test_accelerate_zero3_config_sets_stage_and_precision(cifar_test_shards, tmp_path):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  "launch/accelerate/zero3.yaml", "--num_processes", "2", "-m", "polymodal", "pretrain", CONFIG]
    run(accelerate + overrides(cifar_test_shards, tmp_path), launch_env())
    start = start_event(tmp_path)
    assert (start["launcher"], start["world_size"], start["zero_stage"], start["precision"]) == \
        ("accelerate", 2, 3, "bf16")
    conflict = subprocess.run(accelerate + overrides(cifar_test_shards, tmp_path / "c") + ["zero_stage=1"],
                              cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert conflict.returncode != 0 and "ACCELERATE_DEEPSPEED_ZERO_STAGE" in conflict.stderr
