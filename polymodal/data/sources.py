"""Importers: common dataset layouts read as a sequence of records for the shard writer.

A record is a dict: `source` (where it came from, kept in the shard's .json), and any of `rgb` (encoded image
bytes, or a uint8 array), `caption` (str), `label` (int), `meta` (dict of other fields). Records come in a
fixed order so a conversion is reproducible and can resume by position.

Layouts: an image folder with class subfolders, a .tar/.tar.gz of one, a .jsonl/.csv/.parquet table of image
paths with captions and fields, IDX (.gz) image + label files, and .npz arrays.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from polymodal.data.errors import ConfigError, SampleSkipped
from polymodal.data.idx import read_idx
from polymodal.data.shardlist import natural_key
from polymodal.modalities import IMAGE_EXTENSIONS

Record = dict[str, Any]

IMAGE_FIELDS = ("image", "image_path", "img", "path", "file", "filepath", "filename")
CAPTION_FIELDS = ("caption", "text", "txt", "title", "description")
LABEL_FIELDS = ("label", "cls", "class", "target")
NPZ_IMAGE_KEYS = ("x", "images", "image", "X", "data")
NPZ_LABEL_KEYS = ("y", "labels", "label", "Y", "targets")


@dataclass
class SourceOptions:
    caption: str | None = None  # field name, or a template like "an emoji of {name}"
    image_field: str | None = None
    label_field: str | None = None
    labels_path: str | None = None  # IDX: the labels file, when not the standard sibling name
    classnames: list[str] | None = None
    # Labelled sources: caption templates over the class name {c}; each record gets one (seeded pick).
    label_captions: list[str] | None = None
    shuffle: bool = False
    seed: int = 0
    limit: int | None = None


class Source:
    """Base: subclasses fill `classnames` (or None) and yield records in a fixed order."""

    classnames: list[str] | None = None
    length: int | None = None

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    def failure_hint(self) -> str:
        """Where the records' inputs come from, for an error when none of them could be used ('' if obvious)."""
        return ""


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _class_of(relative: str) -> str | None:
    parent = os.path.dirname(relative)
    return os.path.basename(parent) if parent else None


def _ordered(items: list, opts: SourceOptions) -> list:
    if opts.shuffle:
        items = list(items)
        random.Random(opts.seed).shuffle(items)
    return items[: opts.limit] if opts.limit is not None else items


def _labelled(relatives: list[str]) -> tuple[list[str] | None, dict[str, int]]:
    classes = sorted({c for c in map(_class_of, relatives) if c is not None}, key=natural_key)
    return (classes or None), {c: i for i, c in enumerate(classes)}


class ImageFolderSource(Source):
    """root/<class>/<image>; images directly in root are unlabelled. Class index = sorted folder names."""

    def __init__(self, root: str, opts: SourceOptions):
        self.root = root
        relatives = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            relatives += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if _is_image_name(f)]
        if not relatives:
            raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        relatives.sort(key=natural_key)
        self.classnames, self.index = _labelled(relatives)
        self.classnames = opts.classnames or self.classnames
        self.items = _ordered(relatives, opts)
        self.length = len(self.items)

    def records(self) -> Iterator[Record]:
        for rel in self.items:
            record: Record = {"source": rel}
            try:
                record["rgb"] = Path(self.root, rel).read_bytes()
            except OSError as exc:
                record["error"] = SampleSkipped("unreadable_source", str(exc))  # the writer names the source
            cls = _class_of(rel)
            if cls is not None:
                record["label"] = self.index[cls]
            yield record


class TarballSource(Source):
    """A .tar/.tar.gz of an image folder, read as a stream (or held in memory when shuffling)."""

    def __init__(self, path: str, opts: SourceOptions):
        self.path, self.opts = path, opts
        # A first pass for the names: class indices are the sorted folder names, needed before the first record.
        with tarfile.open(path, "r|*") as tar:
            names = [m.name for m in tar if m.isfile() and _is_image_name(m.name)]
        if not names:
            raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        self.classnames, self.index = _labelled(names)
        self.classnames = opts.classnames or self.classnames
        self.length = min(len(names), opts.limit) if opts.limit is not None else len(names)

    def _members(self) -> Iterator[tuple[str, bytes]]:
        with tarfile.open(self.path, "r|*") as tar:
            for member in tar:
                if member.isfile() and _is_image_name(member.name):
                    yield member.name, tar.extractfile(member).read()

    def records(self) -> Iterator[Record]:
        members: Any = self._members()
        if self.opts.shuffle:
            # A stream cannot be shuffled in place; the members are small enough to hold (CIFAR: 50k x 1 KB).
            members = _ordered(sorted(members, key=lambda m: natural_key(m[0])), self.opts)
        elif self.opts.limit is not None:
            members = (m for i, m in zip(range(self.opts.limit), members))
        for name, data in members:
            record: Record = {"source": name, "rgb": data}
            cls = _class_of(name)
            if cls is not None:
                record["label"] = self.index[cls]
            yield record


def _read_table(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        rows.append({"__error__": f"line {line_no}: {exc}"})
        return rows
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _pick_field(rows: list[dict], asked: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if asked:
        if not any(asked in r for r in rows[:100]):
            raise ConfigError(f"the table has no {what} field {asked!r}; fields: {sorted(rows[0])}")
        return asked
    return next((c for c in candidates if c in rows[0]), None)


def _table_classes(rows: list[dict], field: str | None,
                   classnames: list[str] | None) -> tuple[list[str] | None, dict[str, int] | None]:
    """Class names and a name -> index map when labels are names; (classnames, None) when they are integers."""
    if field is None:
        return classnames, None
    values = [r[field] for r in rows if r.get(field) is not None]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in values):
        return classnames, None
    found = sorted({str(v) for v in values}, key=natural_key)
    if classnames and not set(found) <= set(classnames) and len(found) == len(classnames):
        # Labels are ids (e.g. ImageNet wnids): their sorted order is the index, classnames are the display names.
        return classnames, {label: i for i, label in enumerate(found)}
    names = classnames or found
    return names, {name: i for i, name in enumerate(names)}


class TableSource(Source):
    """.jsonl / .csv / .parquet rows: an image path (relative to the table), a caption, a label, other fields."""

    def __init__(self, path: str, opts: SourceOptions):
        self.root = os.path.dirname(os.path.abspath(path))
        rows = _read_table(path)
        if not rows:
            raise ConfigError(f"{path} has no rows")
        self.image_field = _pick_field(rows, opts.image_field, IMAGE_FIELDS, "image")
        self.label_field = _pick_field(rows, opts.label_field, LABEL_FIELDS, "label")
        caption = opts.caption
        self.template = caption if caption and "{" in caption else None
        self.caption_field = None if self.template else _pick_field(rows, caption, CAPTION_FIELDS, "caption")
        if self.image_field is None and self.caption_field is None and self.template is None:
            raise ConfigError(f"{path}: found neither an image field ({', '.join(IMAGE_FIELDS)}) nor a caption "
                              "field; name them with --image-field / --caption")
        self.classnames, self.label_index = _table_classes(rows, self.label_field, opts.classnames)
        self.rows = _ordered(rows, opts)
        self.length = len(self.rows)

    def failure_hint(self) -> str:
        if not self.image_field:
            return ""
        return (f"image paths were read from column {self.image_field!r} (relative to {self.root}); "
                "name the right column with --image-field")

    def _caption(self, row: dict) -> str | None:
        if self.template:
            try:
                return self.template.format(**row)
            except (KeyError, IndexError) as exc:
                raise SampleSkipped("missing_modality", f"caption template needs field {exc}") from None
        value = row.get(self.caption_field) if self.caption_field else None
        return None if value is None else str(value)

    def _label(self, value: Any) -> int:
        if self.label_index is not None:
            if str(value) not in self.label_index:
                raise SampleSkipped("bad_label", f"label {value!r} is not among the class names")
            return self.label_index[str(value)]
        return int(value)

    def records(self) -> Iterator[Record]:
        used = {self.image_field, self.caption_field, self.label_field}
        for i, row in enumerate(self.rows):
            record: Record = {"source": str(row.get(self.image_field) or f"row {i}")}
            try:
                if "__error__" in row:
                    raise SampleSkipped("unreadable_source", row["__error__"])
                if self.image_field:
                    record["rgb"] = Path(self.root, str(row[self.image_field])).read_bytes()
                caption = self._caption(row)
                if caption is not None:
                    record["caption"] = caption
                if self.label_field and row.get(self.label_field) is not None:
                    record["label"] = self._label(row[self.label_field])
            except SampleSkipped as exc:
                record["error"] = exc
            except (OSError, KeyError, ValueError) as exc:
                detail = f"no field {exc}" if isinstance(exc, KeyError) else str(exc)
                record["error"] = SampleSkipped("unreadable_source", detail)
            record["meta"] = {k: v for k, v in row.items() if k not in used and not k.startswith("__")}
            yield record


class ArraySource(Source):
    """Images and labels as arrays: an IDX images file (labels beside it) or an .npz with x/y arrays."""

    def __init__(self, path: str, opts: SourceOptions):
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                image_key = next((k for k in NPZ_IMAGE_KEYS if k in data), None)
                label_key = next((k for k in NPZ_LABEL_KEYS if k in data), None)
                if image_key is None:
                    raise ConfigError(f"{path}: no image array (looked for {', '.join(NPZ_IMAGE_KEYS)}); "
                                      f"arrays: {list(data.keys())}")
                images = data[image_key]
                labels = data[label_key] if label_key else None
        else:
            images = read_idx(path)
            labels_path = opts.labels_path or path.replace("-images-idx3-", "-labels-idx1-")
            labels = read_idx(labels_path) if labels_path != path and os.path.exists(labels_path) else None
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ConfigError(f"{path}: expected uint8 images [N,H,W] or [N,H,W,C], got {images.dtype} "
                              f"{list(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ConfigError(f"{path}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        if labels is not None:
            count = int(labels.max()) + 1
            self.classnames = opts.classnames or [str(i) for i in range(count)]
            if len(self.classnames) < count:
                raise ConfigError(f"{len(self.classnames)} class names given but labels go up to {count - 1}")
        self.order = _ordered(list(range(len(images))), opts)
        self.length = len(self.order)
        self.name = os.path.basename(path)

    def records(self) -> Iterator[Record]:
        for i in self.order:
            record: Record = {"source": f"{self.name}[{i}]", "rgb": self.images[i]}
            if self.labels is not None:
                record["label"] = int(self.labels[i])
            yield record


class LabelCaptions(Source):
    """A labelled source whose records also get a caption made from their class name ('a photo of a {c}.').

    Each record's template is picked by a hash of its origin and the seed, so a conversion stays reproducible
    and resumable by position, and a class's samples spread over all the templates.
    """

    def __init__(self, inner: Source, templates: list[str], seed: int):
        if not inner.classnames:
            raise ConfigError("--label-captions needs labelled data (class subfolders, a label field or labels file)")
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise ConfigError(f"--label-captions: template {bad[0]!r} has no {{c}} for the class name")
        self.inner, self.templates, self.seed = inner, templates, seed
        self.classnames, self.length = inner.classnames, inner.length

    def failure_hint(self) -> str:
        return self.inner.failure_hint()

    def records(self) -> Iterator[Record]:
        for record in self.inner.records():
            if "label" in record and "caption" not in record:
                pick = zlib.crc32(f"{self.seed}:{record['source']}".encode()) % len(self.templates)
                record["caption"] = self.templates[pick].replace("{c}", self.classnames[record["label"]])
            yield record


def open_source(path: str, opts: SourceOptions) -> Source:
    """Pick the importer from what SOURCE is (with label captions added when asked)."""
    source = _open_layout(path, opts)
    return LabelCaptions(source, opts.label_captions, opts.seed) if opts.label_captions else source


def _open_layout(path: str, opts: SourceOptions) -> Source:
    if not os.path.exists(path):
        raise ConfigError(f"source {path} does not exist")
    lower = path.lower()
    if os.path.isdir(path):
        return ImageFolderSource(path, opts)
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return TarballSource(path, opts)
    if lower.endswith((".jsonl", ".csv", ".parquet")):
        return TableSource(path, opts)
    if lower.endswith((".npz", ".gz", "-ubyte")):
        return ArraySource(path, opts)
    raise ConfigError(f"do not know how to read {path}: expected a folder, .tar/.tar.gz, .jsonl/.csv/.parquet, "
                      "IDX (.gz) or .npz")
