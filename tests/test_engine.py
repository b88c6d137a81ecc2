"""The training engine with real processes on CPU: DeepSpeed (DS_ACCELERATOR=cpu), gloo, torchrun, real data.

Exact resume is checked bitwise: the per-step losses of an interrupted and resumed run equal the uninterrupted
run's, float for float.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, polymodal_cmd, subprocess_env
from polymodal.pretrain.distributed import free_port

CONFIG = str(REPO / "configs" / "engine-cifar10.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def env() -> dict:
    out = subprocess_env()
    out["DS_ACCELERATOR"] = "cpu"
    return out


def settings(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [CONFIG, f"data.shards={shards / 'test'}", f"run_dir={run_dir}", "log.progress=false",
            "data.num_workers=1", "checkpoint.every=4", "checkpoint.keep=5", *extra]


def pretrain(shards, run_dir, *extra, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = polymodal_cmd() + ["pretrain"]
    else:
        cmd = TORCHRUN + ["--standalone", f"--nproc_per_node={ranks}", "-m", "polymodal", "pretrain"]
    done = subprocess.run(cmd + settings(shards, run_dir, *extra), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(cifar_test_shards, tmp_path_factory) -> Path:
    """An uninterrupted single-process run of 12 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    pretrain(cifar_test_shards, run_dir, "steps=12")
    return run_dir


@pytest.fixture(scope="module")
def reference_2ranks(cifar_test_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference2")
    pretrain(cifar_test_shards, run_dir, "steps=12", "zero_stage=2", ranks=2)
    return run_dir


def test_run_writes_metrics_checkpoints_and_weights(reference):
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = rows[0], rows[-1]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait", "flops_per_s", "mem_gb", "acc"):
        assert isinstance(last[key], float), key
    assert last["samples"] == 12 * 64 and last["skipped_steps"] == 0
    assert first["lr"] < rows[5]["lr"]  # warmup
    assert 0 <= last["data_wait"] <= 1 and last["flops_per_s"] > 0
    assert sorted(p.name for p in (reference / "checkpoints").glob("step_*")) == \
        ["step_00000004", "step_00000008", "step_00000012"]
    assert latest(reference) == "step_00000012"
    assert (reference / "tb").is_dir() and any((reference / "tb").iterdir())
    report = subprocess.run(polymodal_cmd() + ["report", str(reference)], env=env(), capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "steps logged       12 (1..12)" in report.stdout and (reference / "report.png").stat().st_size > 10_000


def test_exported_weights_reproduce_the_checkpoint(reference):
    from polymodal.pretrain.export import consolidated_state_dict, load_exported

    model = load_exported(reference / "model.safetensors")
    state = consolidated_state_dict(reference / "checkpoints" / "step_00000012")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_kill_during_checkpoint_write_keeps_previous_and_resume_is_exact(cifar_test_shards, reference, tmp_path):
    killed = pretrain(cifar_test_shards, tmp_path, "steps=12", "faults.inject_kill_in_checkpoint=8", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert latest(tmp_path) == "step_00000004"
    assert not (tmp_path / "checkpoints" / "step_00000008" / "COMPLETE.json").exists()
    pretrain(cifar_test_shards, tmp_path, "steps=12", "resume=latest")
    assert losses(tmp_path) == losses(reference)  # bitwise, every step
    assert [e["event"] for e in events(tmp_path)].count("resume") == 1
    assert latest(tmp_path) == "step_00000012"


def test_sigterm_checkpoints_and_exits_zero_then_resume_is_exact(cifar_test_shards, reference, tmp_path):
    proc = subprocess.Popen(polymodal_cmd() + ["pretrain"] + settings(cifar_test_shards, tmp_path, "steps=12",
                            "checkpoint.every=0"), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = events(tmp_path)[-1]
    assert stopped["event"] == "preempted" and stopped["signal"] == "SIGTERM"
    assert latest(tmp_path) == f"step_{stopped['step']:08d}" and stopped["step"] < 12
    pretrain(cifar_test_shards, tmp_path, "steps=12", "checkpoint.every=0", "resume=latest")
    assert losses(tmp_path) == losses(reference)


def test_kill9_of_a_rank_then_resume_is_exact(cifar_test_shards, reference_2ranks, tmp_path):
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", "-m", "polymodal", "pretrain"]
    proc = subprocess.Popen(cmd + settings(cifar_test_shards, tmp_path, "steps=12", "zero_stage=2"), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 6, proc)
    # The ranks are torchrun's children (their data-loader workers are grandchildren).
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one rank dies; torchrun then stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    # Checkpoints every 4 steps: the kill lands after step 6, and on a busy machine the ranks may pass step 8
    # before it does; either way the run stopped short and resumes from its last whole checkpoint.
    assert latest(tmp_path) in ("step_00000004", "step_00000008")
    pretrain(cifar_test_shards, tmp_path, "steps=12", "zero_stage=2", "resume=latest", ranks=2)
    assert losses(tmp_path) == losses(reference_2ranks)


def test_nonfinite_steps_are_skipped_then_abort_with_clean_checkpoint(cifar_test_shards, tmp_path):
    from polymodal.pretrain.export import consolidated_state_dict

    one = tmp_path / "one"
    pretrain(cifar_test_shards, one, "steps=6", "faults.inject_nonfinite_steps=[3]")
    rows = {json.loads(l)["step"]: json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()}
    assert rows[3]["grad_norm"] is None and rows[3]["skipped_steps"] == 1 and rows[6]["skipped_steps"] == 1
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (1, 2, 4, 5, 6))  # finite again after the skip

    many = tmp_path / "many"
    done = pretrain(cifar_test_shards, many, "steps=12", "checkpoint.every=2", "faults.max_nonfinite_in_row=3",
                    "faults.inject_nonfinite_steps=[5,6,7]", check=False)
    assert done.returncode == 3, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert "3 non-finite steps in a row (steps 5-7)" in message and "resume=latest" in message
    assert latest(many) == "step_00000007"
    before = consolidated_state_dict(many / "checkpoints" / "step_00000004")
    after = consolidated_state_dict(many / "checkpoints" / "step_00000007")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad steps changed nothing
    assert events(many)[-1]["event"] == "abort"


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"), ("zero_stage=5", "zero_stage"), ("objective.modle=x", "objective.modle"),
    ("objective.name=nope", "objective.name"), ("steps=ten", "steps"),
])
def test_config_errors_are_one_line_naming_the_key(cifar_test_shards, tmp_path, override, key):
    done = pretrain(cifar_test_shards, tmp_path, override, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("polymodal: error:") and key in lines[0], done.stderr


def test_fresh_run_refuses_to_overwrite_checkpoints(cifar_test_shards, reference):
    done = pretrain(cifar_test_shards, reference, "steps=12", check=False)
    assert done.returncode == 2 and "resume=latest" in done.stderr


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_match_one_rank_at_zero_stage(cifar_test_shards, tmp_path, stage):
    script = str(REPO / "tests" / "engine_equivalence.py")
    shards = str(cifar_test_shards / "test")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, script, "--shards", shards, "--out", str(one), "--zero-stage", str(stage)],
                   cwd=REPO, env=env(), check=True, capture_output=True)
    subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=2", script, "--shards", shards, "--out", str(two),
                               "--zero-stage", str(stage)], cwd=REPO, env=env(), check=True, capture_output=True)
    single, double = json.loads(one.read_text())["losses"], json.loads(two.read_text())["losses"]
    assert len(single) == 4 and single[-1] < single[0]
    assert double == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_zero3_checkpoint_exports_to_safetensors_with_identical_outputs(cifar_test_shards, tmp_path):
    from polymodal.pretrain.export import export_safetensors, load_exported

    script = str(REPO / "tests" / "engine_equivalence.py")
    run_dir = tmp_path / "run"
    subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=2", script, "--shards",
                               str(cifar_test_shards / "test"), "--out", str(tmp_path / "l.json"), "--zero-stage",
                               "3", "--outputs", str(run_dir)], cwd=REPO, env=env(), check=True,
                   capture_output=True)
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # every rank wrote its shard
    out = export_safetensors(ckpt, tmp_path / "model.safetensors")
    model = load_exported(out)
    reference = torch.load(run_dir / "logits.pt")
    from polymodal.data.pipeline import ShardLoader
    from polymodal.distributed import Placement
    from polymodal.pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(CONFIG, [f"data.shards={cifar_test_shards / 'test'}", "data.batch_size=32",
                                        "data.num_workers=0", "data.shuffle_buffer=0", "data.augment=false"])
    images = next(iter(ShardLoader(cfg.data, where=Placement(0, 1))))["rgb"].float()
    with torch.no_grad():
        logits = model.model((images - model.mean) / model.std)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)


def test_bf16_exports_the_same_fp32_masters_at_zero0_and_zero2(cifar_test_shards, tmp_path):
    """Every ZeRO stage exports fp32 master weights: ZeRO 0 keeps them in its optimizer's state (its module holds
    bf16 casts), ZeRO 2 in its partitions. The same seed and data give the same tensors, bit for bit, which also
    needs ZeRO 0's half-precision wrapper not to take its extra state-initialising AdamW step (engine.py).
    Clipping is off: the two wrappers compute the global norm in different orders."""
    from safetensors.torch import load_file

    exports = {}
    for stage in (0, 2):
        run_dir = tmp_path / f"zero{stage}"
        pretrain(cifar_test_shards, run_dir, "steps=3", "precision=bf16", f"zero_stage={stage}", "grad_clip=0",
                 "checkpoint.every=0")
        exports[stage] = load_file(run_dir / "model.safetensors")
    zero0, zero2 = exports[0], exports[2]
    assert zero0.keys() == zero2.keys() and all(v.dtype == torch.float32 for v in zero0.values())
    assert all(torch.equal(zero0[k], zero2[k]) for k in zero0)
    weights = [v for k, v in zero0.items() if k.endswith("weight")]
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights)  # masters, not bf16 casts


def test_two_nodes_on_loopback_train_and_checkpoint(cifar_test_shards, tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        TORCHRUN + ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                    f"--master_port={port}", "-m", "polymodal", "pretrain"]
        + settings(cifar_test_shards, tmp_path, "steps=4", "zero_stage=1"),
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    marker = json.loads((tmp_path / "checkpoints" / "step_00000004" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == 1
    assert len(list((tmp_path / "checkpoints" / "step_00000004").glob("rank_*.pt"))) == 2
    assert events(tmp_path)[0]["launcher"] == "torchrun" and len(losses(tmp_path)) == 4


def test_srun_style_start_without_a_launcher(cifar_test_shards, tmp_path):
    """What `srun polymodal pretrain` gives each task: SLURM_* variables only."""
    port = free_port()
    procs = []
    for rank in range(2):
        task_env = env()
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            task_env.pop(var, None)
        task_env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                        SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(port - 15000 + 20000 * 3),
                        MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(polymodal_cmd() + ["pretrain"] + settings(cifar_test_shards, tmp_path,
                                      "steps=4", "zero_stage=2"), cwd=REPO, env=task_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    start = events(tmp_path)[0]
    assert start["launcher"] == "slurm" and start["world_size"] == 2
    assert len(losses(tmp_path)) == 4


def test_resume_at_another_world_size_through_a_universal_checkpoint(cifar_test_shards, reference_2ranks,
                                                                      tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_2ranks, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_00000008\n")
    for late in ("step_00000012",):
        shutil.rmtree(run_dir / "checkpoints" / late)
    refused = pretrain(cifar_test_shards, run_dir, "steps=12", "zero_stage=2", "resume=latest", check=False)
    assert refused.returncode == 2 and "polymodal checkpoint universal" in refused.stderr
    convert = subprocess.run(polymodal_cmd() + ["checkpoint", "universal", str(run_dir)], env=env(),
                             capture_output=True, text=True, cwd=REPO)
    assert convert.returncode == 0, convert.stderr[-3000:]
    pretrain(cifar_test_shards, run_dir, "steps=12", "zero_stage=2", "resume=latest")
    resumed = [e for e in events(run_dir) if e["event"] == "resume"][-1]
    assert resumed["world_size"] == 1 and resumed["tag"] == "step_00000008"
    after, before = losses(run_dir), losses(reference_2ranks)
    assert sorted(after) == list(range(1, 13))
    # Same weights and optimizer state, other data order: the loss carries on from where it was.
    assert abs(after[9] - before[9]) < 0.3 and after[12] < after[1]


def test_activation_checkpointing_gives_the_same_losses(cifar_test_shards, reference, tmp_path):
    pretrain(cifar_test_shards, tmp_path, "steps=3", "activation_checkpointing=true", "checkpoint.export=false")
    recomputed, plain = losses(tmp_path), losses(reference)
    # Within warmup the schedule does not depend on the total step count, so steps 1-3 are comparable.
    assert [recomputed[s] for s in (1, 2, 3)] == pytest.approx([plain[s] for s in (1, 2, 3)], rel=1e-6)


def test_our_transformer_stack_trains_at_zero0_and_zero3_bf16_with_and_without_checkpointing(cifar_test_shards,
                                                                                            tmp_path):
    """classify's polymodal-vit (polymodal/models/transformer.py blocks) under the engine on 2 ranks, bf16: ZeRO-3
    builds it partitioned (zero.Init) and matches ZeRO 0; activation checkpointing changes no loss (that it really
    recomputes is tests/test_transformer.py's recompute count)."""
    vit = ["objective.model=polymodal-vit", "steps=3", "precision=bf16", "checkpoint.export=false",
           "objective.model_kwargs={img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 4}"]
    runs = {name: tmp_path / name for name in ("zero0", "zero3", "zero3-ckpt")}
    pretrain(cifar_test_shards, runs["zero0"], *vit, "zero_stage=0", ranks=2)
    started = pretrain(cifar_test_shards, runs["zero3"], *vit, "zero_stage=3", ranks=2)
    pretrain(cifar_test_shards, runs["zero3-ckpt"], *vit, "zero_stage=3", "activation_checkpointing=true", ranks=2)
    starts = {name: events(run)[0] for name, run in runs.items()}
    assert not starts["zero0"]["partitioned_init"] and starts["zero3"]["partitioned_init"]
    assert starts["zero3"]["attention_backends"]["sdpa"] == "yes"
    assert "built partitioned (zero.Init)" in started.stderr and "attention backends on cpu: " in started.stderr
    zero0, zero3, ckpt = (losses(run) for run in runs.values())
    assert len(zero3) == 3 and all(math.isfinite(v) for v in zero3.values())
    assert list(zero3.values()) == pytest.approx(list(zero0.values()), rel=2e-2)  # bf16 sums in other orders
    assert list(ckpt.values()) == pytest.approx(list(zero3.values()), rel=1e-6)
