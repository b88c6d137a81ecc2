"""Consolidated fp32 weights out of any checkpoint (ZeRO 0-3) into safetensors, in registered formats, and DeepSpeed
universal checkpoints.

The polymodal format holds the objective's state dict with its config in the metadata, so `load_exported`
rebuilds the same module without DeepSpeed. Universal checkpoints let a run resume at another world size.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from polymodal.data.errors import ConfigError
from polymodal.pretrain import checkpoint

log = logging.getLogger("polymodal")


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights (and buffers) of a checkpoint, gathered from however many ZeRO shards it has.

    At ZeRO 1-3 DeepSpeed's zero_to_fp32 reads the master copies from the optimizer shards. At ZeRO 0 the module's
    own weights are the masters only in fp32; under bf16/fp16 they are half-precision casts, and the fp32 masters
    sit in the optimizer's state, so every stage exports the same fp32 weights."""
    marker = checkpoint.read_marker(path)
    if marker["zero_stage"] != 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    # Whole model in one file; DeepSpeed's pickle (our own file, so full unpickling is acceptable).
    states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if marker.get("precision", "fp32") != "fp32":
        state.update(_zero0_masters(states["optimizer"], marker["objective"], marker.get("param_groups")))
    return state


def _zero0_masters(optimizer_state: dict, objective: dict, recorded_groups: list[list[str]] | None
                   ) -> dict[str, torch.Tensor]:
    """The fp32 master copy of each trainable parameter from DeepSpeed's ZeRO-0 half-precision optimizer state
    (FP16_UnfusedOptimizer: a list of tensors per group; FP16_Optimizer: one flat tensor per group). The groups
    hold the parameters in the order polymodal.pretrain.optim built them: recorded in the checkpoint, or (older
    checkpoints) rebuilt from the objective."""
    from polymodal.pretrain.objectives import build_objective
    from polymodal.pretrain.optim import param_group_names

    model = build_objective(dict(objective))
    groups = recorded_groups or [names for names, *_ in param_group_names(model)]
    shapes = dict((name, p.shape) for name, p in model.named_parameters())
    if "fp32_groups" in optimizer_state:
        tensors = optimizer_state["fp32_groups"]
    elif "fp32_groups_flat" in optimizer_state:
        tensors = [flat.split([shapes[n].numel() for n in names])
                   for flat, names in zip(optimizer_state["fp32_groups_flat"], groups)]
    else:
        raise ConfigError(f"this ZeRO-0 checkpoint's optimizer state holds no fp32 master weights "
                          f"(keys: {', '.join(optimizer_state)})")
    if [len(t) for t in tensors] != [len(names) for names in groups]:
        raise ConfigError("the checkpoint's fp32 master weights do not match the objective's parameter groups")
    return {name: t.detach().float().reshape(shapes[name]) for names, group in zip(groups, tensors)
            for name, t in zip(names, group)}


def write_safetensors(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    """`state` to `out` atomically (a crash leaves no half-written file under the final name)."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory; contiguous copies are plain and portable.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    tmp.replace(out)
    return out


# Export formats: `checkpoint export --format NAME` dispatches here. `polymodal` serves every objective; an
# objective lists the others it supports in `Objective.export_formats`, and the module that knows the format
# registers its converter next to the objective (open_clip in contrastive.py); `timm` calls the objective's
# `timm_export` hook (SparK's convnets, MultiMAE's ViT).


@dataclass(frozen=True)
class ExportFormat:
    name: str
    default_file: str  # under RUN_DIR
    # (checkpoint folder) -> (tensors, metadata) to write
    convert: Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, str]]]


_FORMATS: dict[str, ExportFormat] = {}


def register_export(name: str, default_file: str):
    def add(convert):
        _FORMATS[name] = ExportFormat(name, default_file, convert)
        return convert

    return add


@register_export("polymodal", "model.safetensors")
def polymodal_format(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The objective's whole state with its config, for load_exported and `polymodal eval`."""
    marker = checkpoint.read_marker(path)
    metadata = {"polymodal.objective": json.dumps(marker["objective"]), "polymodal.step": str(marker["step"])}
    if marker.get("image_size"):  # the training resolution, the default for evaluation
        metadata["polymodal.image_size"] = str(marker["image_size"])
    return consolidated_state_dict(path), metadata


@register_export("timm", "timm_backbone.safetensors")
def timm_format(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The pretrained image backbone as a timm state dict (the objective's `timm_export`): `timm.create_model` of
    the model named in the metadata (`timm.model`, with `timm.model_kwargs` as JSON when the shape is not the
    name's default) loads it with only the classifier head missing, and `polymodal eval --model timm:NAME:FILE`
    evaluates it."""
    return load_checkpoint_objective(path).timm_export(checkpoint.read_marker(path).get("image_size"))


def load_checkpoint_objective(path: Path):
    """The checkpoint's objective module with its consolidated fp32 weights (for converters that need the model)."""
    from polymodal.pretrain.objectives import build_objective

    objective = build_objective(dict(checkpoint.read_marker(path)["objective"]))
    objective.load_state_dict(consolidated_state_dict(path))
    return objective


def export_checkpoint(path: Path, fmt: str = "polymodal", out: Path | None = None) -> Path:
    """Write checkpoint `path` in format `fmt` to `out` (default: RUN_DIR/<the format's file>)."""
    from polymodal.pretrain.objectives import objective_class

    if not checkpoint.is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint")
    name = checkpoint.read_marker(path)["objective"].get("name", "")
    offered = objective_class(name).export_formats  # importing the objectives registers their formats
    if fmt not in offered:
        raise ConfigError(f"--format {fmt}: objective {name!r} exports to {', '.join(offered)}"
                          + ("" if fmt in _FORMATS else f" (known formats: {', '.join(sorted(_FORMATS))})"))
    chosen = _FORMATS[fmt]
    tensors, metadata = chosen.convert(path)
    return write_safetensors(tensors, out or path.parent.parent / chosen.default_file, metadata)


def export_safetensors(path: Path, out: Path) -> Path:
    """The polymodal format (what training writes to RUN_DIR/model.safetensors at the end)."""
    return export_checkpoint(path, "polymodal", out)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of any .safetensors file (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def exported_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported file: polymodal.objective (JSON), polymodal.step, polymodal.image_size."""
    metadata = safetensors_metadata(path)
    if "polymodal.objective" not in metadata:
        raise ConfigError(f"{path} was not written by polymodal (no objective in its metadata)")
    return metadata


def load_exported(path: str | Path):
    """The objective module with the exported weights (no DeepSpeed, no distributed)."""
    from safetensors.torch import load_file

    from polymodal.pretrain.objectives import build_objective
    from polymodal.tokenizers.bundle import unbundle

    metadata = exported_metadata(path)
    config = json.loads(metadata["polymodal.objective"])
    tensors = load_file(str(path))
    for modality, folder in unbundle(tensors, metadata).items():  # a standalone export's own tokenizers
        config["modalities"][modality]["tokenizer"] = folder
    objective = build_objective(config)
    objective.load_state_dict(tensors, strict=True)
    return objective.eval()


def init_from_export(objective, path: str | Path) -> list[str]:
    """Copy into `objective` every tensor of the polymodal export `path` whose name and shape match one of its own
    (a previous run's projections into a new run, say); returns the names copied. Nothing matching is an error."""
    from safetensors.torch import load_file

    own = objective.state_dict()
    found = load_file(str(path))
    matched = {k: v for k, v in found.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError(f"config key 'init_from': no tensor of {path} matches a name and shape of objective "
                          f"{objective.name!r} (it holds {', '.join(sorted(found)[:4])}...)")
    objective.load_state_dict(matched, strict=False)
    return sorted(matched)


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
