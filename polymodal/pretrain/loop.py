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

from polymodal.config import to_yaml
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.models.attention import describe_backends, usable_backends
from polymodal.pretrain import TrainingAborted, checkpoint
from polymodal.pretrain.config import PretrainConfig, check_paths
from polymodal.pretrain.distributed import World, init_distributed, patient_barrier, shutdown
from polymodal.pretrain.engine import (Engine, StepResult, model_construction, resolve_precision_and_stage,
                                       to_device)
from polymodal.pretrain.export import init_from_export
from polymodal.pretrain.flops import device_peak_flops, training_flops_per_sample
from polymodal.pretrain.objectives import build_objective, objective_class
from polymodal.pretrain.optim import param_group_names
from polymodal.pretrain.runlog import RunLog, memory_gb

log = logging.getLogger("polymodal")


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
    check_paths(cfg)  # every path is checked before any data is read or any step taken

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    construction, partitioned = model_construction(cfg, world, objective_class(cfg.objective.get("name", "")))
    with construction:
        objective = build_objective(cfg.objective)  # pretrained files named in its config are read here
    objective.check_run(cfg, stage)  # its own settings and paths (end-of-run evaluation sets)
    initialised = init_from_export(objective, cfg.init_from) if cfg.init_from else []
    # The optimizer's parameter order, recorded with checkpoints (export reads ZeRO-0 fp32 masters by it).
    group_names = [names for names, *_ in param_group_names(objective, cfg.optim.lr_scale)]
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
    # A partitioned model runs only inside its engine, on every rank at once (its layers gather their weights).
    flops_per_sample = None if partitioned else training_flops_per_sample(objective, first)
    batches = itertools.chain([first], batches)

    engine = Engine(cfg, objective, world, load_universal=start.universal)
    if partitioned:
        flops_per_sample = training_flops_per_sample(engine.module, to_device(first, world.device),
                                                     collective=True)
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
                     device=world.device.type, partitioned_init=partitioned,
                     attention_backends=usable_backends(str(world.device)))  # probed: ~1 s of tiny calls
        # Under ZeRO-3 a parameter's own tensor is this rank's empty placeholder; ds_numel is its full size.
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in objective.parameters()]
        total = sum(n for n, _ in sizes)
        trainable = sum(n for n, grad in sizes if grad)
        runlog.write(f"polymodal pretrain: objective {objective.name}, {total / 1e6:.2f} M parameters "
                     f"({trainable / 1e6:.2f} M trainable), {world.world_size} rank(s) on {world.device.type} ({world.launcher}), ZeRO {stage}, "
                     f"{precision}, global batch {cfg.data.batch_size * cfg.grad_accum * world.world_size}"
                     + (f", resuming from {start.tag}" if start.tag else "")
                     + (f", {len(initialised)} tensors from {cfg.init_from}" if initialised else "")
                     + (", built partitioned (zero.Init)" if partitioned else ""))
        runlog.write(describe_backends(str(world.device)))

    def save(step: int, kill: bool = False) -> Path:
        meta = {"world_size": world.world_size, "zero_stage": stage, "precision": precision,
                "objective": cfg.objective, "image_size": cfg.data.image_size, "epoch": loader.epoch,
                "progress": {"samples": samples_seen, "skipped_steps": skipped_total}, "param_groups": group_names}
        path = checkpoint.save(engine.ds, run_dir, step, world.rank, {"data": loader.state_dict()}, meta,
                               cfg.checkpoint.keep, kill_before_marker=kill)
        if runlog:
            runlog.event("checkpoint", step, tag=path.name)
        return path

    def sync_point(step: int) -> bool:
        """Steps at which the ranks compare notes (one all-reduce, the host waits for the device): logging,
        checkpoints, pictures and the last step. Faults and stop requests are acted on there."""
        return (step % cfg.log.every == 0 or step == cfg.steps
                or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                or bool(cfg.log.images_every and step % cfg.log.images_every == 0))

    # Pictures of the objective's work on the first batch, written by rank 0. Under ZeRO-3 every rank runs the
    # forward too (with no file), since the partitioned weights are gathered collectively.
    draws = bool(cfg.log.images_every) and (world.is_main or stage == 3)
    stop = StopFlag()
    step, in_a_row, last_good, saved_at = start.step, 0, start.step, None
    pending: list[StepResult] = []
    interval_began = time.perf_counter()
    outcome = "end"
    try:
        while step < cfg.steps:
            lr = engine.lr()  # the rate the logged (last) step of an interval ran at
            pending.append(engine.step(batches, poison=(step + 1) in cfg.faults.inject_nonfinite_steps))
            step += 1
            if not sync_point(step):
                continue
            reduced, stop_requested = engine.reduce(pending, stop.requested)
            seconds = time.perf_counter() - interval_began
            first_step = step - len(pending) + 1
            pending = []
            samples = sum(r.samples for r in reduced)
            worst = None  # (length, first step, last step) of the longest run of non-finite steps seen here
            for at, r in enumerate(reduced, start=first_step):
                samples_seen += r.samples
                if r.bad:
                    skipped_total += 1
                    in_a_row += 1
                    if worst is None or in_a_row >= worst[0]:
                        worst = (in_a_row, at - in_a_row + 1, at)
                    if runlog:
                        runlog.event("nonfinite", at, loss=r.metrics.get("loss"), in_a_row=in_a_row)
                        runlog.step({"step": at, "time": time.time(), "epoch": loader.epoch, **r.metrics,
                                     "grad_norm": None, "skipped_steps": skipped_total, "samples": samples_seen})
                else:
                    in_a_row, last_good = 0, at
            last = reduced[-1]
            if runlog and not last.bad:
                tokens = sum(r.tokens for r in reduced)
                flops = flops_per_sample * samples / seconds / world.world_size
                runlog.step({
                    "step": step, "time": time.time(), "epoch": loader.epoch, **last.metrics, "lr": lr,
                    "grad_norm": engine.grad_norm(), "samples_per_s": samples / seconds,
                    "tokens_per_s": tokens / seconds if tokens else None,
                    "data_wait": min(1.0, sum(r.data_wait for r in reduced) / seconds), "flops_per_s": flops,
                    "mfu": flops / peak if peak else None, "mem_gb": memory_gb(world.device),
                    "skipped_steps": skipped_total, "samples": samples_seen})
            if worst is not None and worst[0] >= cfg.faults.max_nonfinite_in_row:
                path = save(step)
                saved_at = step
                message = (f"{worst[0]} non-finite steps in a row (steps {worst[1]}-{worst[2]}); none of them changed "
                           f"the weights, so the checkpoint {path} holds the model as it was after step {last_good}, "
                           "with the data position past the bad batches. Lower optim.lr, raise optim.warmup_steps or "
                           "check the data, then continue with resume=latest")
                if runlog:
                    runlog.event("abort", step, message=message)
                raise TrainingAborted(message)
            if stop_requested:
                save(step)
                saved_at, outcome = step, "preempted"
                if runlog:
                    runlog.event("preempted", step, signal=stop.signal_name)
                    runlog.write(f"stop requested ({stop.signal_name or 'another rank'}): checkpoint at step {step}, "
                                 "exiting; continue with resume=latest")
                break
            if draws and step % cfg.log.images_every == 0:
                objective.log_images(to_device(first, world.device),
                                     run_dir / "images" / f"step_{step:07d}.png" if world.is_main else None)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                kill = cfg.faults.inject_kill_in_checkpoint == step
                save(step, kill=kill)
                saved_at = step
            interval_began = time.perf_counter()
        if outcome == "end" and saved_at != step:
            save(step)
    finally:
        if runlog:
            runlog.close()

    exported = None
    if outcome == "end" and cfg.checkpoint.export:
        exported = export_and_evaluate(cfg, objective, world, run_dir, step, runlog)
    if runlog and outcome == "end":
        runlog.event("end", step, exported=str(exported) if exported else None)
    return {"outcome": outcome, "rank": world.rank, "step": step, "run_dir": str(run_dir), "skipped_steps": skipped_total,
            "exported": str(exported) if exported else None}


def export_and_evaluate(cfg: PretrainConfig, objective, world: World, run_dir: Path, step: int,
                        runlog: RunLog | None) -> Path:
    """Rank 0 writes RUN_DIR/model.safetensors from the last checkpoint; then every rank takes part in the
    objective's end-of-run evaluation of that file. The others wait for the export at a barrier with no short
    time-out (consolidating a large ZeRO-3 model can take longer than the process group's)."""
    import json

    from polymodal.pretrain.export import export_safetensors

    exported = run_dir / "model.safetensors"
    if world.is_main:
        export_safetensors(run_dir / "checkpoints" / checkpoint.tag_for(step), exported)
    patient_barrier(world)
    results = objective.evaluate(run_dir, exported, cfg)
    if results is not None and world.is_main:
        (run_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        if runlog:
            runlog.event("evaluate", step, results=results)
    return exported
