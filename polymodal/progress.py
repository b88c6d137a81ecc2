"""Progress bars that suit both a terminal and a log file.

On a terminal tqdm redraws the bar ten times a second. Written to a file (a SLURM log, `nohup ... > log`), every
redraw is kept, and a run of an hour would leave tens of thousands of them: there the bar is drawn at most once
every `LOG_INTERVAL_S` seconds, which still shows a long job moving.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Any = None, **kwargs: Any):
    """`tqdm(iterable, **kwargs)` drawing rarely when its stream is not a terminal; `dynamic_ncols` on."""
    from tqdm import tqdm

    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S * 2)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
