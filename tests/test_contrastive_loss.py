"""Our CLIP and SigLIP losses equal open_clip's ClipLoss / SigLipLoss (value and gradients) on the same
features, on 1 rank and on 2 ranks (torchrun, gloo), local loss on and off, chunked and unchunked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

SCRIPT = str(REPO / "tests" / "contrastive_parity.py")


@pytest.mark.parametrize("ranks", [1, 2])
def test_losses_match_open_clip(tmp_path, ranks):
    out = tmp_path / "parity.json"
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    subprocess.run(launcher + [SCRIPT, str(out)], cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    result = json.loads(out.read_text())
    rows = result["results"]
    assert result["world_size"] == ranks and len(rows) == 6 * ranks
    assert {(r["loss"], r["local_loss"], r["chunk"]) for r in rows} == {
        ("clip", True, None), ("clip", True, 4), ("clip", False, None), ("clip", False, 4),
        ("siglip", None, None), ("siglip", None, 4)}
    for row in rows:
        assert row["value"] > 0
        assert row["loss_diff"] < 1e-12 and row["grad_diff"] < 1e-12, row


RANKS_SCRIPT = str(REPO / "tests" / "contrastive_ranks.py")


def _ranks_summary(tmp_path, emoji_shards, ranks: int) -> dict:
    out = tmp_path / f"ranks{ranks}.json"
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher + [RANKS_SCRIPT, str(out), str(emoji_shards / "0.tar")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_uneven_rank_batches_equal_one_rank_and_flops_count_without_collectives(tmp_path, emoji_shards):
    """Real emoji pairs split 5 / 4 over 2 gloo ranks (the last batches of an epoch without drop_last) give the
    loss and the averaged gradients of one process holding all 9, for CLIP (local and global loss, chunked) and
    SigLIP; and counting FLOPs on 2 ranks calls no collective (each raises while patched)."""
    one = _ranks_summary(tmp_path, emoji_shards, 1)
    two = _ranks_summary(tmp_path, emoji_shards, 2)
    assert two["world_size"] == 2
    for label, loss in one["losses"].items():
        assert two["losses"][label] == pytest.approx(loss, rel=1e-5), label
        ours, theirs = two["grads"][label], one["grads"][label]
        assert ours["__norms__"].keys() == theirs["__norms__"].keys()
        for name, norm in theirs["__norms__"].items():
            assert ours["__norms__"][name] == pytest.approx(norm, rel=1e-4, abs=1e-7), (label, name)
        for name in set(theirs) - {"__norms__"}:
            import torch

            torch.testing.assert_close(torch.tensor(ours[name]), torch.tensor(theirs[name]), rtol=1e-4, atol=1e-7)
    assert two["flops"]["flops_per_sample"] > 1e6
    assert two["flops"]["patch_bites_outside_counting"]  # the patched collectives would have raised
