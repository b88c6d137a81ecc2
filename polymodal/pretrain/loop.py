"""The training loop of `polymodal pretrain`: one code path from one CPU process to many GPU nodes.

Order of things at start matters for exact resume: the model is built from `seed` on every rank (identical
weights), per-rank randomness is seeded after it, and on resume the saved RNG states are restored last, just
before the first step, so the resumed run continues on the very trajectory the interrupted one was on.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from polymodal.config import to_yaml
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.pretrain import checkpoint
from polymodal.pretrain.config import PretrainConfig
from polymodal.pretrain.distributed import World, init_distributed, shutdown
from polymodal.pretrain.engine import Engine, resolve_precision_and_stage, to_device
from polymodal.pretrain.flops import device_peak_flops, training_flops_per_sample
from polymodal.pretrain.objectives import build_objective
from polymodal.pretrain.runlog import RunLog, memory_gb

log = logging.getLogger("polymodal")


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); the message says what to do."""


@dataclass
class Start:
    """Where this run starts: fresh, or from a checkpoint (possibly a universal one at another world size)."""
    step: int = 0
    tag: str | None = None
    path: Path | None = None
    marker: dict | None = None
    universal: bool = False
    same_layout: bool = True


def plan_start(cfg: PretrainConfig, world: World, stage: int) -> Start:
    run_dir = Path(cfg.run_dir)
    tag = checkpoint.resolve_resume(run_dir, cfg.resume)
    if tag is None:
        if cfg.resume == "latest" and world.is_main:
            log.info("resume=latest: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints")
        return Start()
    path = run_dir / "checkpoints" / tag
    marker = checkpoint.read_marker(path)
    same = marker["world_size"] == world.world_size and marker["zero_stage"] == stage
    if same or (marker["zero_stage"] == 0 and stage == 0):
        # ZeRO 0 keeps whole optimizer state in one file: any world size loads it directly.
        return Start(marker["step"], tag, path, marker, universal=False, same_layout=same)
    universal = path.with_name(tag + checkpoint.UNIVERSAL_SUFFIX)
    if not checkpoint.is_complete(universal):
        raise ConfigError(
            f"config key 'resume': {tag} was written by {marker['world_size']} ranks at ZeRO {marker['zero_stage']}; "
            f"this run has {world.world_size} ranks at ZeRO {stage}. Convert it once with "
            f"`polymodal checkpoint universal {run_dir} --tag {tag}`, then resume again")
    return Start(marker["step"], tag, universal, marker, universal=True, same_layout=False)


def forever(loader: ShardLoader) -> Iterator[dict]:
    """Batches across epochs; the loader's state always describes the batches handed out so far."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError(f"data.shards: an epoch yielded no batch (shards {loader.cfg.shards!r}); see the "
                              "skipped-sample counts above")


def quiet_other_ranks(world: World) -> None:
    import deepspeed.utils.logging as ds_logging

    ds_logging.logger.setLevel(logging.WARNING)
    if not world.is_main:
        logging.getLogger("polymodal").setLevel(logging.ERROR)


class StopFlag:
    """SIGTERM (preemption, `scancel`, torchrun shutting down) and SIGUSR1 (SLURM's warning signal) ask for a
    checkpoint and a clean exit after the current step; all ranks agree through the per-step all-reduce."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def evaluate_exported(cfg: PretrainConfig, weights: Path, runlog: RunLog) -> dict:
    """Retrieval and zero-shot on held-out data with the exported weights (which also proves the export).

    Runs on rank 0 alone (the others wait at a barrier), so the tasks run undistributed.
    """
    import json

    from polymodal.eval.datasets import resolve_dataset
    from polymodal.eval.encoders import load_encoder
    from polymodal.eval.tasks import TaskOptions, cache_folder, zeroshot_classification, zeroshot_retrieval

    model = load_encoder(str(weights), cfg.data.image_size)
    opts = TaskOptions(num_workers=min(cfg.data.num_workers, 2), progress=cfg.log.progress, distributed=False)
    cache = cache_folder(None) / "datasets"
    results, lines = {}, []
    if cfg.evaluate.retrieval_shards:
        dataset = resolve_dataset(cfg.evaluate.retrieval_shards, cache_dir=cache)
        metrics = results["retrieval"] = zeroshot_retrieval(model, dataset, opts)
        lines += [f"retrieval on {metrics['images']} held-out pairs ({cfg.evaluate.retrieval_shards}):",
                  f"{'':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
        for label, key in (("text->image", "image_retrieval"), ("image->text", "text_retrieval")):
            lines.append(f"{label:<14}" + "".join(f"{100 * metrics[f'{key}_recall@{k}']:>7.1f}%" for k in (1, 5, 10)))
    if cfg.evaluate.zeroshot:
        lines.append(f"zero-shot classification:{'':<15}{'top-1':>8}{'top-5':>8}{'mean recall':>13}")
        for shards in cfg.evaluate.zeroshot:
            dataset = resolve_dataset(shards, cache_dir=cache)
            metrics = results[f"zeroshot:{shards}"] = zeroshot_classification(model, dataset, opts)
            lines.append(f"  {shards[-36:]:<38}{100 * metrics['acc1']:>7.1f}%{100 * metrics['acc5']:>7.1f}%"
                         f"{100 * metrics['mean_per_class_recall']:>12.1f}%")
    (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    runlog.event("evaluate", cfg.steps, results=results)
    print("\n".join(lines), flush=True)
    return results


def pretrain(cfg: PretrainConfig) -> dict:
    world = init_distributed()
    try:
        return _train(cfg, world)
    finally:
        shutdown()


def _train(cfg: PretrainConfig, world: World) -> dict:
    quiet_other_ranks(world)
    run_dir = Path(cfg.run_dir)
    precision, stage = resolve_precision_and_stage(cfg, world)
    start = plan_start(cfg, world, stage)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = build_objective(cfg.objective)
    seed = cfg.seed * 1000 + world.rank + 1  # then different randomness per rank (dropout, masking)
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)

    loader = ShardLoader(cfg.data, tokenizer=objective.tokenizer(), where=Placement(world.rank, world.world_size))
    rank_state = checkpoint.load_rank_state(start.path, world.rank) if start.tag else None
    if start.tag and start.same_layout and rank_state is not None:
        loader.load_state_dict(rank_state["data"])
    elif start.tag:
        next_epoch = start.marker.get("epoch", 0) + 1
        loader.set_epoch(next_epoch)
        if world.is_main:
            log.warning("resuming at a different world size: the data stream restarts at epoch %d (the rest of "
                        "epoch %d is skipped; exact resume needs the same ranks and workers)", next_epoch,
                        next_epoch - 1)
    batches = forever(loader)
    first = next(batches)
    flops_per_sample = training_flops_per_sample(objective, first)
    batches = itertools.chain([first], batches)

    engine = Engine(cfg, objective, world, load_universal=start.universal)
    peak = cfg.peak_flops or device_peak_flops(world.device, precision)
    if start.tag:
        checkpoint.load(engine.ds, start.path)
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])
    progress = dict(start.marker.get("progress", {})) if start.marker else {}
    samples_seen = progress.get("samples", 0)
    skipped_total = progress.get("skipped_steps", 0)

    runlog = None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        runlog = RunLog(run_dir, start.step, cfg.steps, cfg.log.tensorboard, cfg.log.progress)
        runlog.event("resume" if start.tag else "start", start.step, world_size=world.world_size,
                     zero_stage=stage, precision=precision, launcher=world.launcher, tag=start.tag,
                     device=world.device.type)
        # Under ZeRO-3 a parameter's own tensor is this rank's empty placeholder; ds_numel is its full size.
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in objective.parameters()]
        total = sum(n for n, _ in sizes)
        trainable = sum(n for n, grad in sizes if grad)
        runlog.write(f"polymodal pretrain: objective {objective.name}, {total / 1e6:.2f} M parameters "
                     f"({trainable / 1e6:.2f} M trainable), {world.world_size} rank(s) on {world.device.type} ({world.launcher}), ZeRO {stage}, "
                     f"{precision}, global batch {cfg.data.batch_size * cfg.grad_accum * world.world_size}"
                     + (f", resuming from {start.tag}" if start.tag else ""))

    def save(step: int, kill: bool = False) -> Path:
        meta = {"world_size": world.world_size, "zero_stage": stage, "precision": precision,
                "objective": cfg.objective, "image_size": cfg.data.image_size, "epoch": loader.epoch,
                "progress": {"samples": samples_seen, "skipped_steps": skipped_total}}
        path = checkpoint.save(engine.ds, run_dir, step, world.rank, {"data": loader.state_dict()}, meta,
                               cfg.checkpoint.keep, kill_before_marker=kill)
        if runlog:
            runlog.event("checkpoint", step, tag=path.name)
        return path

    # Pictures of the objective's work (spark's reconstructions) on the first batch, written by rank 0. Under ZeRO-3
    # every rank runs the forward too (with no file), since the partitioned weights are gathered collectively.
    draw = getattr(objective, "save_reconstruction", None) if cfg.log.images_every else None
    if draw is not None and not world.is_main and stage != 3:
        draw = None
    stop = StopFlag()
    step, in_a_row, last_good, saved_at = start.step, 0, start.step, None
    outcome = "end"
    try:
        while step < cfg.steps:
            began = time.perf_counter()
            lr = engine.lr()
            result = engine.step(batches, poison=(step + 1) in cfg.faults.inject_nonfinite_steps)
            metrics, flags = engine.average_over_ranks(result, stop.requested)
            step += 1
            seconds = time.perf_counter() - began
            samples_seen += flags["samples"]
            bad = flags["skipped"] or flags["nonfinite_loss"]
            if bad:
                skipped_total += 1
                in_a_row += 1
                if runlog:
                    runlog.event("nonfinite", step, loss=metrics.get("loss"), in_a_row=in_a_row)
            else:
                in_a_row, last_good = 0, step
            if runlog and (step % cfg.log.every == 0 or bad or step == cfg.steps):
                flops = flops_per_sample * flags["samples"] / seconds / world.world_size
                runlog.step({
                    "step": step, "time": time.time(), "epoch": loader.epoch, **metrics, "lr": lr,
                    "grad_norm": None if bad else engine.grad_norm(),
                    "samples_per_s": flags["samples"] / seconds,
                    "tokens_per_s": flags["tokens"] / seconds if flags["tokens"] else None,
                    "data_wait": min(1.0, flags["data_wait"] / seconds), "flops_per_s": flops,
                    "mfu": flops / peak if peak else None, "mem_gb": memory_gb(world.device),
                    "skipped_steps": skipped_total, "samples": samples_seen})
            if in_a_row >= cfg.faults.max_nonfinite_in_row:
                path = save(step)
                saved_at = step
                message = (f"{in_a_row} non-finite steps in a row (steps {last_good + 1}-{step}); none of them "
                           f"changed the weights, so the checkpoint {path} holds the model as it was after step "
                           f"{last_good}, with the data position past the bad batches. Lower optim.lr, raise "
                           "optim.warmup_steps or check the data, then continue with resume=latest")
                if runlog:
                    runlog.event("abort", step, message=message)
                raise TrainingAborted(message)
            if flags["stop"]:
                save(step)
                saved_at, outcome = step, "preempted"
                if runlog:
                    runlog.event("preempted", step, signal=stop.signal_name)
                    runlog.write(f"stop requested ({stop.signal_name or 'another rank'}): checkpoint at step {step}, "
                                 "exiting; continue with resume=latest")
                break
            if draw is not None and step % cfg.log.images_every == 0:
                draw(to_device(first, world.device),
                     run_dir / "images" / f"step_{step:07d}.png" if world.is_main else None)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                kill = cfg.faults.inject_kill_in_checkpoint == step
                save(step, kill=kill)
                saved_at = step
        if outcome == "end" and saved_at != step:
            save(step)
    finally:
        if runlog:
            runlog.close()

    exported = None
    if outcome == "end" and cfg.checkpoint.export:
        if world.is_main:
            from polymodal.pretrain.export import export_safetensors

            exported = export_safetensors(run_dir / "checkpoints" / checkpoint.tag_for(step),
                                          run_dir / "model.safetensors")
            if cfg.evaluate.retrieval_shards or cfg.evaluate.zeroshot:
                evaluate_exported(cfg, exported, runlog)
        if dist.is_initialized() and world.world_size > 1:
            dist.barrier()
    if runlog and outcome == "end":
        runlog.event("end", step, exported=str(exported) if exported else None)
    return {"outcome": outcome, "rank": world.rank, "step": step, "run_dir": str(run_dir), "skipped_steps": skipped_total,
            "exported": str(exported) if exported else None}
