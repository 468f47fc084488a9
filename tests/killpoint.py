"""Run ``dwm ARGS`` and SIGKILL it at a chosen file commit: a kill at an exact point of the
work, not after a delay (the kill tests' wall-clock races).

Every finished file of the project, and every zarr chunk of the feature cache, is committed by a
rename (``os.rename`` / ``os.replace``; checkpoints and final/ folders too). This wrapper counts
them and kills its own process right before (``before``) or right after (``after``)
rename number N::

    python tests/killpoint.py N before|after COUNT_FILE -- ARGS...

N = 0 kills nothing and writes the number of renames of the whole run to COUNT_FILE, so a test
can pick kill points inside the run it is going to interrupt. Reports (``report*.json``) are
rewritten on a timer, so their renames are not counted: the count is the same on every run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

UNCOUNTED = "report"  # files rewritten on a timer (preprocess report.json every 10 s)


class Renames:
    """Counts (and names) the renames of this process while armed; kills it at one of them."""

    def __init__(self, at: int = 0, when: str = "after"):
        self.at, self.when = at, when
        self.targets: list[str] = []  # destination of each rename, in order
        self._lock = threading.Lock()  # zarr commits chunks from its own threads
        self._real = (os.rename, os.replace)

    def _hook(self, real):
        def commit(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)).startswith(UNCOUNTED):
                return real(src, dst, *args, **kwargs)
            with self._lock:
                self.targets.append(os.fspath(dst))
                n = len(self.targets)
            if n == self.at and self.when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(src, dst, *args, **kwargs)
            if n == self.at and self.when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return commit

    def __enter__(self) -> Renames:
        os.rename, os.replace = (self._hook(f) for f in self._real)
        return self

    def __exit__(self, *exc: object) -> None:
        os.rename, os.replace = self._real


def main(argv: list[str]) -> int:
    at, when, count_file, sep, *args = argv
    assert sep == "--" and when in ("before", "after"), argv
    from dwm.shared import cli

    with Renames(int(at), when) as renames:
        rc = cli.main(args)
    if int(at) == 0:
        with open(count_file, "w") as fh:
            fh.write(str(len(renames.targets)))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
