"""Checkpoints that are never half-written as far as `resume` can tell, and can be taken anywhere.

Layout: RUN_DIR/checkpoints/step_00000100/ holds DeepSpeed's files (every rank writes its shard), one
`rank_NNNNN.pt` per rank (RNG states and the data pipeline position) and, written last by rank 0 after all
ranks are done, `COMPLETE.json`. `checkpoints/latest` names the newest complete tag and is replaced
atomically (write + rename), so a crash at any moment leaves it naming a usable checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from polymodal.data.errors import ConfigError

log = logging.getLogger("polymodal")

MARKER = "COMPLETE.json"
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text(encoding="utf-8"))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete step checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or, if that file is missing or stale, the newest complete checkpoint."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text(encoding="utf-8").strip()
        if is_complete(ckpt_dir / tag):
            return tag
        log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", pointer, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve_resume(run_dir: Path, resume: str | None) -> str | None:
    """Which checkpoint tag to resume from (None: start fresh). Refuses to silently overwrite a run."""
    ckpt_dir = run_dir / "checkpoints"
    if resume is None:
        if complete_tags(ckpt_dir):
            raise ConfigError(f"config key 'resume': {run_dir} already holds checkpoints; continue it with "
                              "resume=latest, or choose another run_dir")
        return None
    if resume == "latest":
        return latest_tag(ckpt_dir)
    if not is_complete(ckpt_dir / resume):
        have = ", ".join(complete_tags(ckpt_dir)) or "none"
        raise ConfigError(f"config key 'resume': {ckpt_dir / resume} is not a complete checkpoint (complete: {have})")
    return resume


# -- RNG states ------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- save ------------------------------------------------------------------------------------------------------

def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(ds_engine, run_dir: Path, step: int, rank: int, rank_state: dict, meta: dict, keep: int,
         kill_before_marker: bool = False) -> Path:
    """Collective: every rank writes its part; rank 0 then marks the checkpoint complete and moves `latest`."""
    ckpt_dir = run_dir / "checkpoints"
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # leftovers of a write that crashed, or an older run's checkpoint at this step
            shutil.rmtree(path)
    _barrier()
    started = time.perf_counter()
    # The universal-checkpoint version tag lets DeepSpeed's converter accept our checkpoints.
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    client_state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, path / f"rank_{rank:05d}.pt")
    if kill_before_marker:  # fault injection: die with the weights written but the checkpoint not yet complete
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if rank == 0:
        marker = {**meta, "step": step, "tag": tag, "time": time.time(),
                  "seconds_to_write": round(time.perf_counter() - started, 3)}
        write_atomically(path / MARKER, json.dumps(marker, indent=1) + "\n")
        write_atomically(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, keep)
    _barrier()
    return path


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    if tags:
        newest = int(_TAG.match(tags[-1]).group(1))
        for path in ckpt_dir.iterdir():
            match = _TAG.match(path.name)
            if match and int(match.group(1)) < newest and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)


# -- load ------------------------------------------------------------------------------------------------------

def load_rank_state(path: Path, rank: int) -> dict | None:
    file = path / f"rank_{rank:05d}.pt"
    if not file.is_file():
        return None
    # Our own file; it holds numpy/python RNG tuples, which weights_only loading refuses.
    return torch.load(file, map_location="cpu", weights_only=False)


def load(ds_engine, path: Path) -> None:
    """Load DeepSpeed's part: weights, optimizer and scheduler state (every rank, collective)."""
    loaded, _ = ds_engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {path}")
