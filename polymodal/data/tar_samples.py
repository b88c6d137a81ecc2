"""Reading one shard: tar members grouped into samples, each with its position in the shard.

Written here rather than taken from webdataset's `tarfile_to_samples` because the reader needs three things it
does not give: the index of every sample inside its shard (the resume cursor), a reason for every skip
(truncated tar, duplicate key, forbidden member...) instead of one exception type, and a replay mode that
walks a shard again without counting its errors twice.

Plain ustar shards (.tar, .tar.gz), which is what every WebDataset writer produces, are parsed by `_FastTar`
below: Python's `tarfile` spends about 40 us of interpreter time per member, more than decoding a small JPEG
takes. Anything else (pax or GNU long-name headers, other compressions) goes through `tarfile`, which the fast
reader also hands over to mid-shard when it meets such a header.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from typing import IO, Callable, Iterator

from polymodal.data.errors import SkipCounter
from polymodal.data.shardlist import SHARD_SUFFIXES, open_shard
from polymodal.modalities import is_forbidden

# webdataset's convention: the key is the member path up to the first dot of its file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")

RawSample = dict  # {"__key__": str, "__url__": str, extension: bytes, ...}


def split_member_name(name: str) -> tuple[str, str] | None:
    match = _KEY_EXT.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


class _StrictTarInfo(tarfile.TarInfo):
    """A header that cannot be read after the first one means the file was cut, not that the archive ended.

    Plain `tarfile` treats an empty, short or invalid header after offset 0 as a normal end of archive, which
    would hide a truncated shard; only the proper end marker (a zero block) ends it here.
    """

    @classmethod
    def fromtarfile(cls, tarfile_obj):
        try:
            return super().fromtarfile(tarfile_obj)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            if tarfile_obj.offset != 0:
                raise tarfile.ReadError(f"no end-of-archive marker: the file ends inside a header ({exc})") from None
            raise


class _UseTarfile(Exception):
    """The fast reader met something only `tarfile` handles."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
Member = tuple[str, Callable[[], bytes]]  # (name, read its data); data not read is skipped


class _FastTar:
    """Regular-file members of a plain ustar/v7 tar stream, checked like `_StrictTarInfo` checks them."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.unread = 0  # bytes of the current member (with padding) not consumed yet
        self.size = 0

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:
            raise tarfile.ReadError(f"unexpected end of data ({what})")
        return data

    def _data(self) -> bytes:
        data = self._read_exact(self.size, "member data")
        # The padding is skipped with the next header: a file cut inside it still holds this member whole.
        self.unread -= self.size
        return data

    def __iter__(self) -> Iterator[Member]:
        first = True
        while True:
            if self.unread:
                self._read_exact(self.unread, "member data or padding")
                self.unread = 0
            header = self.stream.read(_BLOCK)
            if len(header) < _BLOCK:
                if first and not header:
                    raise tarfile.ReadError("empty file")
                raise tarfile.ReadError("no end-of-archive marker: the file ends inside or before a header")
            if header == _ZERO_BLOCK:
                return
            try:
                checksum = int(header[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
                size = int(header[124:136].rstrip(b"\0 ").strip() or b"0", 8)
            except ValueError:
                checksum = size = -1
            typeflag = header[156:157]
            if checksum != sum(header) - sum(header[148:156]) + 8 * 32 or size < 0:
                if first:
                    raise _UseTarfile  # not a plain tar: let tarfile decide (it also reads other compressions)
                raise tarfile.ReadError("invalid header")
            if typeflag in (b"x", b"g", b"L", b"K"):
                raise _UseTarfile
            first = False
            self.size, self.unread = size, (size + _BLOCK - 1) // _BLOCK * _BLOCK
            if typeflag in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0]
                    name = prefix + b"/" + name if prefix else name
                yield name.decode("utf-8", "surrogateescape"), self._data


def _tarfile_members(stream: IO[bytes], skip: int) -> Iterator[Member]:
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for info in tar:
            if not info.isfile():
                continue
            if skip:
                skip -= 1
                continue

            def read(info=info) -> bytes:
                handle = tar.extractfile(info)
                return handle.read() if handle is not None else b""

            yield info.name, read


def _members(url: str, stream: IO[bytes], allow_pipe: bool) -> Iterator[Member]:
    """Members of the shard open as `stream`; closes the streams it uses."""
    done = 0
    if url.endswith(SHARD_SUFFIXES) and not url.startswith("pipe:"):
        try:
            plain = gzip.GzipFile(fileobj=stream, mode="rb") if url.endswith("gz") else stream
            for member in _FastTar(plain):
                done += 1
                yield member
            return
        except (_UseTarfile, gzip.BadGzipFile) as exc:
            if isinstance(exc, gzip.BadGzipFile) and done:
                raise
            # Start again with tarfile, skipping the members already handed out.
            stream.close()
            stream = open_shard(url, allow_pipe)
    try:
        yield from _tarfile_members(stream, done)
    finally:
        stream.close()


def iter_shard(url: str, counter: SkipCounter | None, allow_pipe: bool = False,
               count_from: int = 0) -> Iterator[tuple[int, RawSample]]:
    """Yield (index, sample) for each well-formed sample of the shard at `url`.

    `index` numbers every group of same-key members in file order, including groups that are then skipped,
    so it is a stable position. Skips at sample index >= `count_from` are counted on `counter`; a resumed
    reader passes its cursor so skips it counted before the save are not counted twice (None: count nothing).
    A shard cut short keeps every sample whose members are whole: only a sample cut inside one of its members
    is dropped. Never raises for bad content.
    """

    def count(reason: str, detail: str, slot: int = 0) -> None:
        if counter is not None and slot >= count_from:
            counter.add(reason, detail)

    try:
        stream = open_shard(url, allow_pipe)
    except (OSError, ValueError) as exc:
        count("missing_shard", f"{url}: {exc}")
        return
    index = 0
    key = None
    group: RawSample = {}
    broken = False
    seen: set[str] = set()
    members_read = 0
    in_member = False  # reading a member's bytes: a cut now leaves the sample in progress incomplete

    def finish():
        """The group collected so far, or None when it must be skipped."""
        if key is None:
            return None
        if broken or key in seen:
            count("duplicate_key", f"{url}: key {key!r} repeated", index)
            return None
        seen.add(key)
        return group

    try:
        for name, read in _members(url, stream, allow_pipe):
            members_read += 1
            parts = split_member_name(name)
            if parts is None:
                continue
            member_key, ext = parts
            if is_forbidden(ext):
                slot = index + 1 if key is not None and member_key != key else index
                count("forbidden_member", f"{url}: {name} (never unpickled)", slot)
                continue
            if member_key != key:
                done = finish()
                if key is not None:
                    if done is not None:
                        yield index, done
                    index += 1
                key, group, broken = member_key, {"__key__": member_key, "__url__": url}, False
            if ext in group:
                broken = True
            # Read after the previous sample went out: a cut inside this member loses only this sample.
            in_member = True
            group[ext] = read()
            in_member = False
        done = finish()
        if done is not None:
            yield index, done
        if members_read == 0:
            count("empty_shard", f"{url}: no members")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if members_read == 0:
            reason = "empty_shard" if "empty" in str(exc).lower() else "corrupt_shard"
            count(reason, f"{url}: {exc}")
            return
        detail = f"{url}: {exc} after {members_read} members"
        if in_member:
            count("truncated_shard", f"{detail}; the sample it was reading is dropped", index)
            return
        # Cut between members: the sample in progress holds only whole members, so it is kept. It is counted
        # after it went out, at the next slot, so a reader resumed after it counts the cut once.
        done = finish()
        if done is not None:
            yield index, done
        count("truncated_shard", detail, index + 1)
    finally:
        try:
            stream.close()
        except Exception:
            pass
