"""The Python side of benchmarks/gpu_check.sh and gpu_wheels.sh: which wheel in the wheel folder serves each line of
benchmarks/gpu_wheels.txt, and the GPU check's summary JSON. Standard library and `packaging` only (both machines
have them; pip's own copy is the fallback), so it runs before anything is installed.

    python benchmarks/gpu_kit.py resolve [--wheels wheels] [--python-version 3.12]   # the wheel list; exit 3 if any
                                                                                      # line has no wheel
    python benchmarks/gpu_kit.py summary OUT_DIR PARTS_TSV                           # gpu_check_summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags, sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags, sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "gpu_wheels.txt"
KINDS = ("site", "build", "binary", "newer", "peer")
# Linux x86-64 platforms a target Python accepts (newest glibc first, as pip ranks them); the GPU machine's image
# is a recent one (glibc 2.39 on Ubuntu 24.04, which Python 3.12.3 suggests).
LINUX_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def read_manifest(path: Path = MANIFEST) -> list[tuple[Requirement, str]]:
    """(requirement, kind) for each line of gpu_wheels.txt."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, kind = line.partition(" ")
        kind = kind.strip() or "site"
        if kind not in KINDS:
            sys.exit(f"{path}:{number}: kind {kind!r} is not one of {', '.join(KINDS)}")
        out.append((Requirement(spec), kind))
    return out


def target_tags(python_version: str | None) -> list:
    """The wheel tags the target interpreter accepts, best first: this interpreter's, or CPython X.Y on Linux
    x86-64."""
    if not python_version:
        return list(sys_tags())
    version = tuple(int(v) for v in python_version.split("."))[:2]
    return list(cpython_tags(version, platforms=LINUX_PLATFORMS)) + list(
        compatible_tags(version, f"cp{version[0]}{version[1]}", LINUX_PLATFORMS))


def resolve(wheels: Path, python_version: str | None) -> tuple[list[dict], list[str]]:
    """For each manifest line, the best wheel in `wheels` for the target (rows), and the lines none serves."""
    ranks = {tag: i for i, tag in enumerate(target_tags(python_version))}
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    rows, missing = [], []
    for req, kind in read_manifest():
        best = None
        for path in files:
            try:
                name, version, _build, tags = parse_wheel_filename(path.name)
            except ValueError:
                continue
            if name != canonicalize_name(req.name) or not req.specifier.contains(version, prereleases=True):
                continue
            rank = min((ranks[t] for t in tags if t in ranks), default=None)
            if rank is not None and (best is None or (rank, -len(path.name)) < best[0]):
                best = ((rank, -len(path.name)), path, str(version))
        if best is None:
            missing.append(f"{req} ({kind})")
        else:
            rows.append({"requirement": str(req), "kind": kind, "version": best[2], "file": best[1].name,
                         "bytes": best[1].stat().st_size})
    return rows, missing


def cmd_resolve(args) -> int:
    wheels = Path(args.wheels)
    rows, missing = resolve(wheels, args.python_version)
    target = f"CPython {args.python_version} on Linux x86-64" if args.python_version else \
        f"this Python ({sys.executable}, {sys.version.split()[0]})"
    if args.format == "tsv":  # for the shell: kind, pip requirement, file
        for row in rows:
            print(f"{row['kind']}\t{row['requirement']}\t{row['file']}")
    else:
        print(f"wheels in {wheels}/ for {target}:")
        for row in rows:
            print(f"  {row['requirement']:28s} {row['kind']:7s} {row['bytes'] / 2**20:6.2f} MiB  {row['file']}")
        total = sum(r["bytes"] for r in rows)
        print(f"  {'total of these':28s} {'':7s} {total / 2**20:6.2f} MiB")
    if missing:
        what = f"not found ({len(missing)} wheels expected)" if not wheels.is_dir() else \
            f"has no wheel for {', '.join(missing)} (for {target})"
        print(f"FAIL: wheel folder {wheels}/ {what}; run `bash benchmarks/gpu_wheels.sh` where pip reaches the "
              "registry", file=sys.stderr)
        return 3
    return 0


def rounded(value):
    """Floats to 4 significant digits, inside lists and dicts too (headlines are for reading)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def headline(name: str, report: dict) -> dict:
    """The few figures worth reading first from one part's JSON."""
    return rounded(_headline(name, report))


def _headline(name: str, report: dict) -> dict:
    if name == "engine_overhead":
        res = report.get("results", {})
        return {k: res.get(k) for k in ("ratio", "ratio_spread", "goal_met")} | {
            f"{loop}_{k}": res.get("loops", {}).get(loop, {}).get(k) for loop in ("ours", "bare")
            for k in ("step_s_median", "samples_per_s", "mfu")}
    if name == "spark_step":
        return {"samples_per_s": report.get("samples_per_s"), "ratio": report.get("ratio"),
                "ratio_per_round": report.get("ratio_per_round"),
                "first_loss_match": report.get("loss_check", {}).get("match")}
    if name == "eval_speed":
        return {"goal_met": report.get("goal_met")} | {
            part: {k: entry.get(k) for k in ("ratio", "equal_accuracy", "goal_met")}
            | {f"{side}_seconds": entry.get(side, {}).get("seconds") for side in ("ours", "peer")}
            for part, entry in report.get("results", {}).items()}
    if name == "clip_step":
        res = report.get("results", {})
        trainers = res.get("trainers", {})
        return {"ratio": res.get("ratio"), "ratio_per_round": res.get("ratio_per_round"),
                "gpu_goal_met": res.get("gpu_goal_met")} | {
            f"{t}_{k}": trainers.get(t, {}).get(k) for t in ("ours", "open_clip")
            for k in ("samples_per_s", "mfu", "data_wait_median")}
    if name == "multimae_step":
        return {"samples_per_s": report.get("samples_per_s"), "ratio": report.get("ratio"),
                "ratio_per_round": report.get("ratio_per_round"), "mfu": report.get("mfu"),
                "peak_mb": {side: entry.get("peak_mb") for side, entry in (report.get("peak_memory") or {}).items()},
                "first_loss_match": report.get("loss_check", {}).get("match")}
    if name == "fourm_step":
        return {"samples_per_s": report.get("samples_per_s"), "ratio": report.get("ratio"),
                "ratio_vs_premasked_peer": report.get("ratio_vs_premasked_peer"), "mfu": report.get("mfu"),
                "peak_mb": report.get("peak_memory_mb"), "first_loss_match": report.get("check", {}).get("match")}
    if name == "fourm_generate":
        return {"caption": report.get("caption"), "image_tokens_per_s": {
            schedule: entry.get("image_tokens_per_s") for schedule, entry in (report.get("images") or {}).items()}}
    if name == "tokenize_speed":
        return {"encode_images_per_s": report.get("encode_images_per_s")}
    if name == "attention":
        return {case: {k: v for k, v in entry.items() if k.startswith(("speedup_vs_ml4m", "memory_ratio_ml4m", "best",
                                                                        "share_of_datasheet"))}
                | {"ours_backend": next((r.get("backend") for r in entry.get("rows", [])
                                         if r.get("method") == "ours-auto"), None)}
                for case, entry in report.get("cases", {}).items()}
    return {}


def pytest_counts(log: Path) -> dict:
    """pytest's closing line ('1 passed, 2 deselected in 3.4s') as numbers."""
    import re

    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", lines[-1])}


def cmd_summary(args) -> int:
    out = Path(args.out_dir)
    parts = []
    for line in Path(args.parts).read_text().splitlines():
        name, code, seconds, limit, json_name, command = line.split("\t", 5)
        part = {"part": name, "command": command, "exit_code": int(code), "seconds": float(seconds),
                "timeout_s": int(limit), "timed_out": int(code) in (124, 137), "skipped": int(code) == -1}
        if json_name:
            path = out / json_name
            part["json"] = json_name if path.is_file() else None
            if path.is_file():
                try:
                    part["headline"] = headline(name, json.loads(path.read_text()))
                except (ValueError, AttributeError, TypeError) as exc:
                    part["headline"] = {"unreadable": str(exc)}
        if name == "pytest_gpu":
            part["headline"] = pytest_counts(Path(args.pytest_log)) if args.pytest_log else {}
        parts.append(part)
    summary = {"ok": all(p["exit_code"] == 0 for p in parts), "parts": parts,
               "parts_seconds": sum(p["seconds"] for p in parts)}
    if args.extra:
        summary.update(json.loads(Path(args.extra).read_text()))
    (out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2))
    for p in parts:
        state = "ok" if p["exit_code"] == 0 else "SKIPPED" if p["skipped"] else "TIMED OUT" if p["timed_out"] \
            else f"FAILED ({p['exit_code']})"
        print(f"  {p['part']:16s} {state:12s} {p['seconds']:6.0f}s  {json.dumps(p.get('headline', {}))[:300]}")
    print(f"wrote {out / 'gpu_check_summary.json'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("resolve", help="the wheel for each line of gpu_wheels.txt; exit 3 naming what is missing")
    r.add_argument("--wheels", default="wheels", help="the wheel folder (default: %(default)s)")
    r.add_argument("--python-version", default=None,
                   help="resolve for CPython X.Y on Linux x86-64 (default: for this interpreter)")
    r.add_argument("--format", choices=("table", "tsv"), default="table")
    r.set_defaults(fn=cmd_resolve)
    s = sub.add_parser("summary", help="gpu_check_summary.json from the parts' records and JSON files")
    s.add_argument("out_dir")
    s.add_argument("parts", help="one line a part: name, exit code (-1: skipped), seconds, timeout, JSON file name, "
                                 "command (tabs)")
    s.add_argument("--pytest-log", default=None)
    s.add_argument("--extra", default=None, help="a JSON file of more top-level keys (machine, wheels)")
    s.set_defaults(fn=cmd_summary)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
