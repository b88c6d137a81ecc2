"""Evaluation datasets: what a `--dataset` spec names, resolved to shards plus class names and templates.

Accepted, in this order:
  DIR with test/ (and train/) split folders   CLIP_benchmark's WebDataset layout, as `polymodal data shards
                                              --split` writes it (classnames.txt, templates, dataset_type.txt)
  DIR of shards, a brace pattern, a glob      one split; class names etc. beside it or in its parent
  a raw source                                an image folder with class subfolders, a .tar.gz of one, IDX
                                              images (.gz), an .npz, a .jsonl/.csv/.parquet table: converted
                                              once into shards under the cache folder, then as above

A classification dataset has labels (classnames.txt); a retrieval one has captions (dataset_type.txt says
`retrieval`; several captions per image are newline-separated in its .txt, CLIP_benchmark's convention).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from polymodal.data.errors import ConfigError
from polymodal.data.shardlist import expand_shards

DEFAULT_TEMPLATE = "a photo of a {c}."
RAW_SUFFIXES = (".tar.gz", ".tgz", ".gz", "-ubyte", ".npz", ".jsonl", ".csv", ".parquet")


@dataclass
class EvalDataset:
    name: str
    test: str  # shard spec of the split evaluated
    train: str | None = None  # shard spec of the split linear probe and kNN fit on
    classnames: list[str] | None = None
    templates: list[str] | None = None
    kind: str = "classification"  # or "retrieval"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _has_shards(folder: Path) -> bool:
    return any(folder.glob("*.tar")) or any(folder.glob("*.tar.gz"))


def _first_file(path: Path) -> str:
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    return member.name
            return ""
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"dataset {path}: not a readable tar file ({exc})") from None


def is_raw_source(path: Path) -> bool:
    """A layout to convert, rather than shards: a shard's members are KEY.EXT at the top level, an image-folder
    tarball's are CLASS/NAME.EXT."""
    if path.is_dir():
        return not _has_shards(path) and not (path / "test").is_dir() and any(p.is_dir() for p in path.iterdir())
    name = path.name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "/" in _first_file(path).removeprefix("./")
    return name.endswith(RAW_SUFFIXES)


def convert_raw(source: str, cache_dir: Path, classnames: list[str] | None = None, quiet: bool = False) -> Path:
    """Shards of a raw source in the cache (written once; keyed by the source's path, size and time)."""
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    stat = os.stat(source)
    key = json.dumps([os.path.abspath(source), stat.st_size, stat.st_mtime_ns, classnames])
    out = cache_dir / f"{Path(source).name.split('.')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (out / "nshards.txt").is_file():
        write_shards(open_source(source, SourceOptions(classnames=classnames)), out,
                     WriterOptions(samples_per_shard=1000), overwrite=True, show_progress=not quiet)
    return out


def _metadata_folder(shard_folder: Path) -> Path:
    for where in (shard_folder, shard_folder.parent):
        if (where / "classnames.txt").is_file() or (where / "dataset_type.txt").is_file():
            return where
    return shard_folder


def resolve_dataset(spec: str, *, train: str | None = None, cache_dir: Path, classnames: list[str] | None = None,
                    templates: list[str] | None = None, name: str | None = None, quiet: bool = False) -> EvalDataset:
    """Resolve `spec` (see the module docstring); `train` names the probe's training split when it is not the
    sibling train/ folder. `classnames` and `templates` override what the dataset ships."""
    name_given, _, rest = spec.partition("=")
    if rest and not Path(spec).exists():
        name, spec = name or name_given, rest
    path = Path(spec)
    if path.exists() and is_raw_source(path):
        path = convert_raw(spec, cache_dir, classnames, quiet)
    if path.is_dir() and (path / "test").is_dir() and not _has_shards(path):
        test_folder, root = path / "test", path
        train = train or (str(path / "train") if (path / "train").is_dir() else None)
    elif path.is_dir():
        test_folder = path
        root = _metadata_folder(path)
    else:
        expand_shards(spec)  # a pattern or glob: fails with a clear message when nothing matches
        test_folder = path.parent
        root = _metadata_folder(path.parent)
    if train is not None and Path(train).exists() and is_raw_source(Path(train)):
        train = str(convert_raw(train, cache_dir, classnames, quiet))
    test = str(test_folder) if path.is_dir() else spec
    expand_shards(test)
    if train is not None:
        expand_shards(train)
    names = classnames or (_lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else None)
    found_templates = root / "zeroshot_classification_templates.txt"
    templates = templates or (_lines(found_templates) if found_templates.is_file() else [DEFAULT_TEMPLATE])
    kind_file = root / "dataset_type.txt"
    kind = _lines(kind_file)[0] if kind_file.is_file() else ("classification" if names else "retrieval")
    default_name = root.name if root.name not in ("test", "train", "val") else root.parent.name
    return EvalDataset(name=name or default_name, test=test, train=train, classnames=names, templates=templates,
                       kind=kind)


def openai_imagenet_templates() -> list[str]:
    """The 80 prompt templates of the CLIP paper for ImageNet, as open_clip ships them, in '{c}' form."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def template_option(value: str | None) -> list[str] | None:
    """--templates: a file (one per line), 'openai_imagenet', or one template with {c}."""
    if value is None:
        return None
    if value == "openai_imagenet":
        return openai_imagenet_templates()
    if os.path.isfile(value):
        return _lines(Path(value))
    if "{c}" not in value:
        raise ConfigError(f"--templates {value!r}: not a file, 'openai_imagenet', or a template with {{c}}")
    return [value]


def check_dataset_spec(spec: str, key: str, labelled: bool = False) -> None:
    """Fail now, naming config key `key`, when `spec` names no readable dataset, or (`labelled`) one without class
    names; a training run calls this at start rather than finding out after training. Raw sources are only looked
    at, not converted."""
    _, _, rest = spec.partition("=")
    path = Path(rest if rest and not Path(spec).exists() else spec)
    where = "" if path.is_absolute() else f" (relative paths are read from the current folder, {Path.cwd()})"
    try:
        if path.exists() and is_raw_source(path):
            return
        dataset = resolve_dataset(str(path), cache_dir=Path.cwd())  # the cache is only written for raw sources
    except ConfigError as exc:
        raise ConfigError(f"config key {key!r}: {exc}{where}") from None
    if labelled and not dataset.classnames:
        raise ConfigError(f"config key {key!r}: {path} has no classnames.txt beside its shards (zero-shot "
                          "classification needs class names)")
