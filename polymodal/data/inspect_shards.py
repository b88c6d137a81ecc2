"""`polymodal data inspect`: what a set of shards holds, checked sample by sample."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from polymodal import modalities
from polymodal.data.errors import SampleSkipped, SkipCounter
from polymodal.data.shardlist import expand_shards
from polymodal.data.tar_samples import iter_shard
from polymodal.progress import progress_bar


@dataclass
class ShardReport:
    shards: int = 0
    samples: int = 0
    members: Counter = field(default_factory=Counter)
    member_bytes: Counter = field(default_factory=Counter)
    per_shard: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)


def inspect_shards(spec: str | list[str], decode: bool = True, examples: int = 3, allow_pipe: bool = False,
                   show_progress: bool = True) -> ShardReport:
    """Read every sample; with `decode`, decode each member through the registry to find bad ones."""
    urls = expand_shards(spec, allow_pipe=allow_pipe)
    report = ShardReport(shards=len(urls))
    counter = SkipCounter(where="inspect")
    for url in progress_bar(urls, unit="shard", disable=not show_progress, desc="inspect"):
        count = 0
        for _, raw in iter_shard(url, counter, allow_pipe):
            count += 1
            found = {}
            try:
                for ext, data in raw.items():
                    if ext.startswith("__"):
                        continue
                    report.members[ext] += 1
                    report.member_bytes[ext] += len(data)
                    modality = _modality_of(ext)
                    if decode and modality is not None:
                        value = modality.decode(data, ext, modalities.DEFAULT_MAX_IMAGE_PIXELS)
                        found[modality.name] = modalities.load_pixels(value) if hasattr(value, "mode") else value
            except SampleSkipped as exc:
                counter.add(exc.reason, f"{url} key {raw['__key__']}: {exc.detail}")
                continue
            report.samples += 1
            if "rgb" in found:
                report.image_sizes["x".join(map(str, found["rgb"].size))] += 1
            if "label" in found:
                report.labels[found["label"]] += 1
            if len(report.examples) < examples:
                report.examples.append({"key": raw["__key__"], **{k: _short(v) for k, v in found.items()}})
        report.per_shard[url] = count
    report.skips = counter.as_dict()
    return report


def _modality_of(ext: str):
    for name in modalities.names():
        modality = modalities.get(name)
        if ext in modality.extensions:
            return modality
    return None


def _short(value) -> str:
    if hasattr(value, "size") and hasattr(value, "mode"):
        return f"image {value.size[0]}x{value.size[1]} {value.mode}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_report(report: ShardReport, stats_file: Path | None = None) -> str:
    lines = [f"shards   {report.shards}", f"samples  {report.samples}"]
    for ext, n in sorted(report.members.items()):
        lines.append(f"  .{ext:<10} {n:>8} members  {report.member_bytes[ext] / 1e6:9.2f} MB")
    if report.image_sizes:
        common = ", ".join(f"{size} ({n})" for size, n in report.image_sizes.most_common(3))
        lines.append(f"image sizes (most common)  {common}")
    if report.labels:
        lines.append(f"labels   {len(report.labels)} classes, {min(report.labels.values())}.."
                     f"{max(report.labels.values())} samples each")
    skipped = sum(report.skips.values())
    lines.append(f"skipped  {skipped}" + (f"  {json.dumps(report.skips)}" if skipped else ""))
    for example in report.examples:
        lines.append("  e.g. " + "  ".join(f"{k}={v}" for k, v in example.items()))
    if stats_file is not None and stats_file.exists():
        stats = json.loads(stats_file.read_text())
        lines.append(f"written  {stats.get('samples')} samples from {stats.get('source')}; "
                     f"failures while writing: {stats.get('failures') or 'none'}")
    return "\n".join(lines)
