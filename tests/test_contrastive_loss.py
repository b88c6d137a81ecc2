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
