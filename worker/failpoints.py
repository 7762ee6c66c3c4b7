"""Failpoints: named places in the worker where a fault test can make a real job process wait.

A fault test has to kill (or pause) a job process *inside* a given stage, and on tiny models most stages
last milliseconds, too short to hit from outside by polling. ``CTPD_FAILPOINTS`` names places and what to do
there, so the test can hold the process at a known point and then send it a real signal::

    CTPD_FAILPOINTS="stage_started:weights=sleep:30@1"   # attempt 1 sleeps 30 s when weights starts

Each entry is ``<point>=sleep:<seconds>[@<attempt>]``; ``<point>`` is ``stage_started:<stage>`` or
``step:<progress stage>:<step>``. With ``@<attempt>`` only that attempt of the job waits (so the attempt that
resumes after the fault runs through). Unset (every deployment): :func:`hit` is one dictionary lookup. The
process announces each wait on stderr (``failpoint <point> reached``) so the test can see where it stands.
"""

from __future__ import annotations

import os
import sys
import time
from functools import lru_cache

ENV = "CTPD_FAILPOINTS"


@lru_cache(maxsize=1)
def _table(raw: str) -> dict[str, tuple[float, int | None]]:
    table: dict[str, tuple[float, int | None]] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        point, _, action = entry.partition("=")
        action, _, attempt = action.partition("@")
        kind, _, seconds = action.partition(":")
        if kind != "sleep" or not seconds:
            raise ValueError(f"{ENV}: {entry!r} is not <point>=sleep:<seconds>[@<attempt>]")
        table[point] = (float(seconds), int(attempt) if attempt else None)
    return table


def hit(point: str, attempt: int | None = None) -> None:
    """Wait here if ``CTPD_FAILPOINTS`` names ``point`` (for this attempt)."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    found = _table(raw).get(point)
    if found is None:
        return
    seconds, only_attempt = found
    if only_attempt is not None and attempt != only_attempt:
        return
    print(f"failpoint {point} reached (attempt {attempt}, pid {os.getpid()}); sleeping {seconds:g} s",
          file=sys.stderr, flush=True)
    time.sleep(seconds)
