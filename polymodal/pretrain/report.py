"""`polymodal report RUN_DIR`: a one-page summary and a PNG of curves for a training run directory.

Reads what a run leaves behind (metrics.jsonl, events.jsonl, checkpoints/, model.safetensors) and never the
model itself, so it works on a run that is still going, was killed, or was copied off a cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.data.errors import ConfigError

# Events drawn as vertical lines on every panel: (colour, line style, legend label).
_MARKERS = {
    "resume": ("tab:green", "--", "resume"),
    "checkpoint": ("0.6", ":", "checkpoint"),
    "nonfinite": ("tab:red", "-", "non-finite"),
}
_FINAL_FRACTION = 0.10  # "final loss" = mean over this last share of the logged steps


@dataclass
class Run:
    """What a run directory holds, parsed once for both the summary and the plot."""

    path: Path
    rows: list[dict]  # one per step, sorted by step, last logged occurrence wins
    bad_lines: int = 0  # unparsable lines in metrics.jsonl (e.g. the last one of a killed process)
    events: list[dict] = field(default_factory=list)
    bad_event_lines: int = 0


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Objects of a JSON-lines file and the count of lines that are not JSON objects."""
    objects, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(obj, dict):
                objects.append(obj)
            else:
                bad += 1
    return objects, bad


def load_run(run_dir: str | Path) -> Run:
    """Parse RUN_DIR; a missing run dir or a metrics.jsonl without any step is a ConfigError."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"run directory not found: {path}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"no metrics in {path}: {metrics} does not exist")
    objects, bad = _read_jsonl(metrics)
    by_step: dict[int, dict] = {}
    for obj in objects:
        step = obj.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            bad += 1
            continue
        # A resumed run re-logs the steps after its checkpoint: the later line describes the run that continued.
        by_step.pop(step, None)
        by_step[step] = obj
    if not by_step:
        detail = f" ({bad} unparsable lines)" if bad else ""
        raise ConfigError(f"{metrics} holds no metric rows{detail}")
    run = Run(path=path, rows=[by_step[s] for s in sorted(by_step)], bad_lines=bad)
    events = path / "events.jsonl"
    if events.is_file():
        run.events, run.bad_event_lines = _read_jsonl(events)
    return run


def _number(value) -> float | None:
    """A finite float, or None for null, NaN/inf, strings and booleans."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, leaving out steps where it is null or non-finite."""
    steps, values = [], []
    for row in rows:
        value = _number(row.get(key))
        if value is not None:
            steps.append(row["step"])
            values.append(value)
    return steps, values


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average seeded with the first value (no warm-up bias towards 0)."""
    alpha = 2.0 / (span + 1)
    out: list[float] = []
    for v in values:
        out.append(v if not out else out[-1] + alpha * (v - out[-1]))
    return out


def _ema_span(n: int) -> int:
    # A tenth of the points, capped: short smoke runs are not flattened and long runs are not noisy.
    return max(1, min(100, n // 10))


def loss_keys(rows: list[dict]) -> list[str]:
    """'loss' first, then every other numeric metric whose name starts with 'loss', in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss") and _number(value) is not None:
                keys.setdefault(key)
    return sorted(keys, key=lambda k: k != "loss")


# ---------------------------------------------------------------------------------------------------------------
# summary


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _last(rows: list[dict], key: str) -> float | None:
    """The value at the last step where the metric is known (cumulative counters like samples)."""
    _, values = series(rows, key)
    return values[-1] if values else None


def _checkpoints(run_dir: Path) -> tuple[int, int, str | None]:
    """(complete, incomplete, latest tag) of RUN_DIR/checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return 0, 0, None
    tags = [p for p in root.iterdir() if p.is_dir()]
    complete = sum((p / "COMPLETE.json").is_file() for p in tags)
    latest_file = root / "latest"
    latest = latest_file.read_text(encoding="utf-8").strip() if latest_file.is_file() else ""
    return complete, len(tags) - complete, latest or None


def summarize_run(run: Run, png: Path | None = None) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table; metrics that were never logged are left out."""
    rows = run.rows
    table: list[tuple[str, str]] = [("run dir", str(run.path))]
    first, last = rows[0]["step"], rows[-1]["step"]
    logged = f"{len(rows)} ({first}..{last})"
    if run.bad_lines:
        logged += f"; {run.bad_lines} unparsable line{'s' * (run.bad_lines != 1)} skipped"
    table.append(("steps logged", logged))

    samples = _last(rows, "samples")
    if samples is not None:
        table.append(("samples seen", f"{int(samples):,}"))
    _, times = series(rows, "time")
    if len(times) > 1:
        table.append(("wall time", _duration(max(times) - min(times))))

    steps, losses = series(rows, "loss")
    if losses:
        tail = losses[-max(1, math.ceil(len(losses) * _FINAL_FRACTION)):]
        last_n = f"{len(tail)} step{'s' * (len(tail) != 1)}"
        table.append(("final loss", f"{statistics.fmean(tail):.4f} (mean of last {last_n})"))
        smooth = ema(losses, _ema_span(len(losses)))
        best = min(range(len(smooth)), key=smooth.__getitem__)
        table.append(("best EMA loss", f"{smooth[best]:.4f} at step {steps[best]}"))

    for key, label in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")):
        _, values = series(rows, key)
        if values:
            table.append((label, f"{statistics.median(values):,.1f} median"))
    _, wait = series(rows, "data_wait")
    if wait:
        table.append(("data wait", f"{100 * statistics.fmean(wait):.1f}% mean"))
    _, mfu = series(rows, "mfu")
    if mfu:
        table.append(("MFU", f"{100 * statistics.median(mfu):.1f}% median"))
    _, mem = series(rows, "mem_gb")
    if mem:
        table.append(("peak memory", f"{max(mem):.2f} GB"))

    skipped = _last(rows, "skipped_steps")  # a running total, so the last step holds the run's count
    nonfinite = sum(e.get("event") == "nonfinite" for e in run.events)
    if skipped is not None or nonfinite:
        text = str(int(skipped or 0))
        if nonfinite:
            text += f" ({nonfinite} non-finite event{'s' * (nonfinite != 1)})"
        table.append(("skipped steps", text))

    if run.events or (run.path / "events.jsonl").is_file():
        resumes = sum(e.get("event") == "resume" for e in run.events)
        table.append(("resumes", str(resumes)))
        # Only when nothing started again afterwards: an abort followed by a resume is history, not the end.
        lifecycle = [e for e in run.events if e.get("event") in ("start", "resume", "end", "abort", "preempted")]
        if lifecycle and lifecycle[-1]["event"] not in ("start", "resume"):
            e = lifecycle[-1]
            text = f"{e['event']} at step {e.get('step', '?')}"
            if e.get("message"):
                text += f": {e['message']}"
            table.append(("ended", text))

    complete, incomplete, latest = _checkpoints(run.path)
    text = f"{complete} complete" + (f", {incomplete} incomplete" if incomplete else "")
    if latest:
        ok = (run.path / "checkpoints" / latest / "COMPLETE.json").is_file()
        text += f"; latest {latest}" + ("" if ok else " (NOT complete)")
    table.append(("checkpoints", text))

    weights = run.path / "model.safetensors"
    table.append(("model.safetensors", f"yes ({weights.stat().st_size / 1e6:.1f} MB)" if weights.is_file() else "no"))
    if png is not None:
        table.append(("plot", str(png)))
    return table


def format_table(table: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in table)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in table)


# ---------------------------------------------------------------------------------------------------------------
# plot


def plot_run(run: Run, out_png: Path) -> Path:
    """Write the curves of `run` to `out_png`: one panel per metric group that was logged."""
    # The object API with the Agg canvas: no pyplot state, no display, and the caller's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = run.rows
    panels = []  # functions drawing one panel each, only for metrics present

    def loss_panel(ax):
        for i, key in enumerate(loss_keys(rows)):
            steps, values = series(rows, key)
            colour = f"C{i}"
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(values, _ema_span(len(values))), color=colour, linewidth=1.6, label=f"{key} (EMA)")
        ax.set_ylabel("loss")
        ax.legend(fontsize="small")

    def simple_panel(key, ylabel, log=False):
        def draw(ax):
            ax.plot(*series(rows, key), color="C0", linewidth=1.0)
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
        return draw

    def throughput_panel(ax):
        ax.plot(*series(rows, "samples_per_s"), color="C0", linewidth=1.0)
        ax.set_ylabel("samples/s", color="C0")
        tokens = series(rows, "tokens_per_s")
        if tokens[0]:
            twin = ax.twinx()
            twin.plot(*tokens, color="C1", linewidth=1.0)
            twin.set_ylabel("tokens/s", color="C1")

    def fraction_panel(ax):
        for i, (key, label) in enumerate((("data_wait", "data wait"), ("mfu", "MFU"))):
            steps, values = series(rows, key)
            if values:
                ax.plot(steps, [100 * v for v in values], color=f"C{i}", linewidth=1.0, label=label)
        ax.set_ylabel("%")
        ax.legend(fontsize="small")

    if loss_keys(rows):
        panels.append(("loss", loss_panel))
    if series(rows, "lr")[0]:
        panels.append(("learning rate", simple_panel("lr", "lr")))
    if series(rows, "samples_per_s")[0]:
        panels.append(("throughput", throughput_panel))
    if series(rows, "data_wait")[0] or series(rows, "mfu")[0]:
        panels.append(("data wait / MFU", fraction_panel))
    if any(v > 0 for v in series(rows, "grad_norm")[1]):
        panels.append(("grad norm", simple_panel("grad_norm", "grad norm", log=True)))

    ncols = 2 if len(panels) > 1 else 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(6.5 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{run.path.resolve().name}: steps {rows[0]['step']}..{rows[-1]['step']}")
    if not panels:  # only step/time were logged: still write a PNG so the command's output is predictable
        fig.text(0.5, 0.5, "no plottable metrics in metrics.jsonl", ha="center", va="center")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel() if panels else []
    for ax, (title, draw) in zip(axes, panels):
        draw(ax)
        _mark_events(ax, run.events)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes)[len(panels):]:
        ax.set_visible(False)
    if panels and any(e.get("event") in _MARKERS for e in run.events):
        _event_legend(fig)

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def _mark_events(ax, events: list[dict]) -> None:
    for event in events:
        style = _MARKERS.get(event.get("event"))
        step = _number(event.get("step"))
        if style and step is not None:
            colour, linestyle, _ = style
            ax.axvline(step, color=colour, linestyle=linestyle, linewidth=0.9, alpha=0.8, zorder=0)


def _event_legend(fig) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linestyle=ls, label=label) for c, ls, label in _MARKERS.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)


# ---------------------------------------------------------------------------------------------------------------
# entry points


def report(run_dir: str | Path, out_png: str | Path | None = None) -> str:
    """Write the PNG (default RUN_DIR/report.png) and return the summary table as text."""
    run = load_run(run_dir)
    png = Path(out_png) if out_png is not None else run.path / "report.png"
    plot_run(run, png)
    return format_table(summarize_run(run, png))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNG (default: RUN_DIR/report.png)")


def cmd_report(args: argparse.Namespace) -> int:
    """For `set_defaults(func=cmd_report)` next to add_arguments."""
    print(report(args.run_dir, args.out))
    return 0
