"""Consolidated weights out of any checkpoint (ZeRO 0-3) into safetensors, and DeepSpeed universal checkpoints.

The safetensors file holds the objective's state dict with its config in the metadata, so `load_exported`
rebuilds the same module without DeepSpeed. Universal checkpoints let a run resume at another world size.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from polymodal.data.errors import ConfigError
from polymodal.pretrain import checkpoint

log = logging.getLogger("polymodal")


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """fp32 weights (and buffers) of a checkpoint, gathered from however many ZeRO shards it has."""
    marker = checkpoint.read_marker(path)
    if marker["zero_stage"] == 0:
        # Whole model in one file; DeepSpeed's pickle (our own file, so full unpickling is acceptable).
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def export_safetensors(path: Path, out: Path) -> Path:
    if not checkpoint.is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint")
    marker = checkpoint.read_marker(path)
    metadata = {"polymodal.objective": json.dumps(marker["objective"]), "polymodal.step": str(marker["step"])}
    if marker.get("image_size"):  # the training resolution, the default for evaluation
        metadata["polymodal.image_size"] = str(marker["image_size"])
    return _write_safetensors(consolidated_state_dict(path), out, metadata)


def _write_safetensors(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    """`state` to `out` atomically (a crash leaves no half-written file under the final name)."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory; contiguous copies are plain and portable.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    tmp.replace(out)
    return out


def export_open_clip(path: Path, out: Path) -> Path:
    """A checkpoint of a `clip`/`siglip` objective as an open_clip state dict (safetensors), loadable with
    `open_clip.create_model_and_transforms(name, pretrained=out)` (our own configs: import
    polymodal.models.open_clip_towers first, which registers them with open_clip)."""
    marker = checkpoint.read_marker(path)
    if marker["objective"].get("name") not in ("clip", "siglip"):
        raise ConfigError(f"{path}: only clip/siglip checkpoints export to open_clip (this is "
                          f"{marker['objective'].get('name')!r})")
    state = consolidated_state_dict(path)
    model = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return _write_safetensors(model, out, {"open_clip.model": marker["objective"].get("model", "")})


def export_timm(path: Path, out: Path) -> Path:
    """The image backbone of a checkpoint whose objective offers `backbone_state_dict` (spark) as a timm state dict
    (safetensors): `timm.create_model(name)` loads it with only the classifier head missing, and `polymodal eval
    --model timm:NAME:FILE` evaluates it."""
    from polymodal.pretrain.objectives import build_objective

    marker = checkpoint.read_marker(path)
    objective = build_objective(dict(marker["objective"]))
    if not hasattr(objective, "backbone_state_dict"):
        raise ConfigError(f"{path}: objective {marker['objective'].get('name')!r} has no timm backbone to export "
                          "(spark has)")
    objective.load_state_dict(consolidated_state_dict(path))
    return _write_safetensors(objective.backbone_state_dict(), out,
                              {"timm.model": str(marker["objective"].get("model", ""))})


def exported_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported file: polymodal.objective (JSON), polymodal.step, polymodal.image_size."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "polymodal.objective" not in metadata:
        raise ConfigError(f"{path} was not written by polymodal (no objective in its metadata)")
    return metadata


def load_exported(path: str | Path):
    """The objective module with the exported weights (no DeepSpeed, no distributed)."""
    from safetensors.torch import load_file

    from polymodal.pretrain.objectives import build_objective

    metadata = exported_metadata(path)
    objective = build_objective(json.loads(metadata["polymodal.objective"]))
    objective.load_state_dict(load_file(str(path)), strict=True)
    return objective.eval()


def make_universal(path: Path, workers: int = 2) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format beside it (`<tag>_universal`)."""
    if not checkpoint.is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint")
    marker = checkpoint.read_marker(path)
    if marker["zero_stage"] == 0:
        raise ConfigError(f"{path} is a ZeRO 0 checkpoint: it already resumes at any world size")
    out = path.with_name(path.name + checkpoint.UNIVERSAL_SUFFIX)
    if out.exists():
        shutil.rmtree(out)
    # DeepSpeed's converter is a script; its own process keeps its worker pools away from ours.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
           "--no_strict"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"DeepSpeed's universal conversion failed for {path}:\n{done.stderr[-3000:]}")
    for rank_file in path.glob("rank_*.pt"):
        shutil.copy2(rank_file, out / rank_file.name)
    checkpoint.write_atomically(out / checkpoint.MARKER, json.dumps({**marker, "universal": True}, indent=1) + "\n")
    return out
