"""Reading IDX files (the MNIST / Fashion-MNIST format), plain or gzipped.

Hand-written because the format is a 4-byte magic, the dimensions and raw bytes: a dependency such as
idx2numpy would not make it shorter, and numpy reads the payload directly.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from polymodal.data.errors import ConfigError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    payload = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: header says {dims} but the file holds {payload.size} values (truncated?)")
    return payload.reshape(dims).astype(dtype.newbyteorder("="), copy=False)
