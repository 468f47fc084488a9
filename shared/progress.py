"""Progress of long loops: a tqdm bar on a terminal, a plain line every few seconds elsewhere.

Outside a terminal (CI, ``nohup``, SLURM logs) tqdm's redraws are carriage-return frames that
pile up into one huge log line. There :class:`PlainProgress` prints one ordinary line at most
every ``DWM_PROGRESS_SECONDS`` seconds (default 30) and one when the loop ends.
``DWM_PROGRESS=0`` silences both kinds.

:func:`progress` takes tqdm's arguments (``iterable``, ``total``, ``desc``, ``unit``, ``initial``,
``leave``, ``disable``, ...) and returns either kind; both have ``update``, ``set_postfix``,
``close``, ``n`` and iterate like tqdm.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm as _plain_tqdm
from tqdm.auto import tqdm as _terminal_tqdm

from .errors import ConfigError

DEFAULT_SECONDS = 30.0  # a 10-minute run logs about 20 lines

write = _plain_tqdm.write  # a message that does not break a bar on the terminal


def enabled() -> bool:
    return os.environ.get("DWM_PROGRESS", "1") != "0"


def interval_seconds() -> float:
    raw = os.environ.get("DWM_PROGRESS_SECONDS", "")
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"DWM_PROGRESS_SECONDS={raw!r}: expected a number of seconds >= 0")
    return value


def is_terminal(stream: IO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, leave: bool = True, disable: bool = False,
             file: IO | None = None, **tqdm_kwargs: Any):
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`PlainProgress`."""
    stream = file if file is not None else sys.stderr
    disable = disable or not enabled()
    if is_terminal(stream):
        return _terminal_tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                              leave=leave, disable=disable, file=stream, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                         leave=leave, disable=disable, file=stream)


class PlainProgress:
    """Progress as plain lines: at most one every ``every`` seconds while the loop runs, and a
    last one when it ends (for ``leave=False`` loops only if an earlier line was printed, so a
    short inner loop stays silent)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0, leave: bool = True,
                 disable: bool = False, file: IO | None = None, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = int(initial)
        self.leave, self.disable = leave, disable
        self.file = file
        self.every = interval_seconds() if every is None else float(every)
        self.clock = clock
        self.start = self.last_line = clock()
        self.postfix = ""
        self.lines = 0  # lines printed so far
        self.printed: tuple[int, str] | None = None  # (n, postfix) of the last line
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress: nothing to iterate (made with total= only)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if not self.disable and now - self.last_line >= self.every:
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        """tqdm redraws here; a plain line waits for its interval."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.disable or (self.n, self.postfix) == self.printed:
            return  # nothing new since the last line
        if self.leave or self.lines:
            self._print(self.clock())

    def line(self, now: float) -> str:
        elapsed = max(0.0, now - self.start)
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            count = f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n} {self.unit}"
        timing = f"{_plain_tqdm.format_interval(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            timing += f", {_plain_tqdm.format_interval((self.total - self.n) / rate)} left"
        text = f"{head}{count}, {rate:.3g} {self.unit}/s, {timing}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _print(self, now: float) -> None:
        stream = self.file if self.file is not None else sys.stderr
        print(self.line(now), file=stream, flush=True)
        self.last_line = now
        self.lines += 1
        self.printed = (self.n, self.postfix)
