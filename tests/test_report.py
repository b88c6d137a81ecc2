"""`polymodal report`: summary numbers and the PNG from a synthetic run directory."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from polymodal.data.errors import ConfigError
from polymodal.pretrain.report import add_arguments, cmd_report, ema, report

T0 = 1_763_712_000.0


def good_loss(step: int) -> float:
    return 3.0 - 0.05 * step


def metric_row(step: int, loss: float, skipped: int, mfu: float | None) -> dict:
    return {"step": step, "time": T0 + 2.0 * step, "epoch": 0, "loss": loss, "loss_clip": loss / 2,
            "lr": 1e-3 * min(1.0, (step + 1) / 5), "grad_norm": 1.0 + 0.1 * step, "samples_per_s": 400.0 + step,
            "tokens_per_s": None, "data_wait": 0.1, "flops_per_s": 3e11, "mfu": mfu, "mem_gb": 1.0 + step / 100,
            "skipped_steps": skipped, "samples": 128 * (step + 1), "acc": 0.5}


def table(text: str) -> dict[str, str]:
    """The two-column summary as {label: value}."""
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """30 steps; the first attempt diverges at steps 27..29 and is killed, the resume re-logs them."""
    run = tmp_path / "clip-run"
    run.mkdir()
    lines = []
    for step in range(30):
        loss = 99.0 if step >= 27 else good_loss(step)  # the abandoned attempt: must be overridden
        mfu = None if step < 20 else 0.4  # unknown early on (null), then known
        lines.append(metric_row(step, loss, skipped=2 if step >= 15 else 0, mfu=mfu))
    for step in range(27, 30):  # after the resume: same steps again, these win
        lines.append(metric_row(step, good_loss(step), skipped=2, mfu=0.4))
    text = "".join(json.dumps(row) + "\n" for row in lines)
    text += '{"step": 30, "time": 1763712060.0, "loss": 1.'  # killed mid-write
    (run / "metrics.jsonl").write_text(text)

    events = [{"event": "start", "step": 0, "world_size": 1},
              {"event": "checkpoint", "step": 10, "tag": "step_00000010"},
              {"event": "nonfinite", "step": 14}, {"event": "nonfinite", "step": 15},
              {"event": "checkpoint", "step": 20, "tag": "step_00000020"}, {"event": "resume", "step": 26},
              {"event": "end", "step": 29}]
    (run / "events.jsonl").write_text("".join(json.dumps({"time": T0, **e}) + "\n" for e in events))

    ckpts = run / "checkpoints"
    for tag in ("step_00000010", "step_00000020", "step_00000030"):
        (ckpts / tag).mkdir(parents=True)
    for tag in ("step_00000010", "step_00000020"):  # step_00000030 was interrupted while saving
        (ckpts / tag / "COMPLETE.json").write_text("{}")
    (ckpts / "latest").write_text("step_00000020\n")
    (run / "config.yaml").write_text("model: {}\n")
    return run


def test_report_summary_numbers(run_dir: Path):
    summary = table(report(run_dir))
    assert summary["run dir"] == str(run_dir)
    # 30 distinct steps, not 33: re-logged steps replace the earlier ones; the truncated line is counted.
    assert summary["steps logged"] == "30 (0..29); 1 unparsable line skipped"
    assert summary["samples seen"] == f"{128 * 30:,}"
    assert summary["wall time"] == "58s"
    # Last 10% of 30 steps = steps 27..29, with the values logged after the resume (not 99).
    final = (good_loss(27) + good_loss(28) + good_loss(29)) / 3
    assert summary["final loss"] == f"{final:.4f} (mean of last 3 steps)"
    assert summary["best EMA loss"].endswith("at step 29")  # loss falls monotonically after the override
    # Smoothed over 3 steps (span = 30 // 10): it lags above the raw last value of a falling curve.
    assert good_loss(29) < float(summary["best EMA loss"].split()[0]) < good_loss(27)
    assert summary["samples/s"] == "414.5 median"
    assert "tokens/s" not in summary  # null throughout
    assert summary["data wait"] == "10.0% mean"
    assert summary["MFU"] == "40.0% median"  # nulls are unknown, not zero
    assert summary["peak memory"] == "1.29 GB"
    assert summary["skipped steps"] == "2 (2 non-finite events)"
    assert summary["resumes"] == "1"
    assert summary["ended"] == "end at step 29"
    assert summary["checkpoints"] == "2 complete, 1 incomplete; latest step_00000020"
    assert summary["model.safetensors"] == "no"
    assert summary["plot"] == str(run_dir / "report.png")


def test_report_png(run_dir: Path):
    report(run_dir)
    png = run_dir / "report.png"
    assert png.stat().st_size > 20_000  # five panels of curves, not an empty canvas
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()
    assert width >= 1000 and height >= 600


def test_report_custom_png_path_and_weights(run_dir: Path, tmp_path: Path):
    (run_dir / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    out = tmp_path / "plots" / "run.png"  # parent folder does not exist yet
    summary = table(report(run_dir, out))
    assert out.is_file() and not (run_dir / "report.png").exists()
    assert summary["plot"] == str(out)
    assert summary["model.safetensors"] == "yes (2.0 MB)"


def test_report_minimal_run(tmp_path: Path):
    """Only step/time/loss, no events or checkpoints: the optional rows and panels are left out."""
    run = tmp_path / "tiny"
    run.mkdir()
    rows = [{"step": s, "time": T0 + s, "loss": 1.0 / (s + 1)} for s in range(5)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = table(report(run))
    assert summary["steps logged"] == "5 (0..4)"
    assert summary["final loss"] == "0.2000 (mean of last 1 step)"
    assert summary["checkpoints"] == "0 complete"
    for absent in ("samples/s", "MFU", "resumes", "skipped steps", "samples seen"):
        assert absent not in summary
    with Image.open(run / "report.png") as image:
        assert image.format == "PNG"


def test_last_occurrence_wins_even_out_of_order(tmp_path: Path):
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"step": 0, "time": T0, "loss": 5.0}, {"step": 1, "time": T0 + 1, "loss": 7.0},
            {"step": 0, "time": T0 + 9, "loss": 1.0}, {"step": 1, "time": T0 + 10, "loss": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = table(report(run))
    assert summary["steps logged"] == "2 (0..1)"
    assert summary["final loss"] == "3.0000 (mean of last 1 step)"


def test_ended_only_when_nothing_restarted(run_dir: Path):
    with (run_dir / "events.jsonl").open("a") as f:
        f.write(json.dumps({"time": T0, "event": "resume", "step": 29}) + "\n")
    summary = table(report(run_dir))
    assert "ended" not in summary
    assert summary["resumes"] == "2"


def test_ema():
    assert ema([], 5) == []
    assert ema([2.0, 2.0, 2.0], 5) == [2.0, 2.0, 2.0]  # seeded with the first value: no bias towards 0
    smoothed = ema([0.0, 10.0], 3)  # alpha = 2 / (3 + 1) = 0.5
    assert smoothed == [0.0, 5.0]


def test_missing_run_dir(tmp_path: Path):
    with pytest.raises(ConfigError, match="run directory not found"):
        report(tmp_path / "nope")


def test_missing_metrics(tmp_path: Path):
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        report(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", '{"step": 0, "loss": 1.', '{"loss": 1.0}\n[1, 2]\n'])
def test_empty_or_unusable_metrics(tmp_path: Path, content: str):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=r"metrics\.jsonl holds no metric rows"):
        report(tmp_path)
    assert not (tmp_path / "report.png").exists()


def test_cli_entry(run_dir: Path, tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli.png"
    assert cmd_report(parser.parse_args([str(run_dir), "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "latest step_00000020" in printed and str(out) in printed
    assert out.is_file()
