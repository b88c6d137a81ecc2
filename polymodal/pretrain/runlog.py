"""What a run writes as it goes (rank 0 only): metrics.jsonl, events.jsonl, TensorBoard, a progress bar."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class RunLog:
    def __init__(self, run_dir: Path, start_step: int, total_steps: int, tensorboard: bool, progress: bool):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        self._drop_steps_after(start_step)
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the steps a resumed run redoes.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if progress:
            from polymodal.progress import progress_bar

            self.bar = progress_bar(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                                    desc="pretrain")

    def _drop_steps_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: their old lines go (rewritten atomically)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(self.metrics_path)

    def event(self, event: str, step: int, **fields) -> None:
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "event": event, "step": step, **fields}) + "\n")

    def step(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None:
            shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                     "samples/s": f"{record['samples_per_s']:.0f}"}
            if record.get("mfu") is not None:
                shown["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(record["step"] - self.bar.n)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
