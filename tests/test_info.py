"""`polymodal info`: what it probes is really measured here (attention backends, the CPU's bf16 speed)."""

from __future__ import annotations

import json

from polymodal.cli import main


def test_info_json_lists_probed_backends_and_the_cpu_bf16_speed(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cpu = info["attention"]["cpu"]
    assert cpu["math"] == "yes" and cpu["matmul"] == "yes" and cpu["sdpa"] == "yes"
    assert cpu["flash"].startswith("no:")  # flash-attn runs on CUDA only, and says so
    speedup = info["cpu_bf16_matmul_speedup"]
    assert isinstance(speedup, float) and 0.01 < speedup < 100


def test_info_text_says_whether_bf16_pays_on_this_cpu(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu bf16 matrix products:" in out
    assert ("precision=bf16 trains faster" in out) != ("keep precision=fp32" in out)
