"""Progress of a long stage: a bar on a terminal, a plain line now and then anywhere else.

A bar redraws itself with carriage returns, which a log file or `ray job logs` shows as one ever-growing line. So
when the stream is not a terminal, `Progress` writes the same facts as a line of text: at the first update, then at
most every `every_s` seconds, and at the end unless that line was the last one written. SFT, RLVR, FERBench and
curation all report through it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def shown(value: object) -> str:
    """A field's value as shown: floats to 4 significant digits, the rest as is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """How far a stage is: `update(n, **fields)` after each unit of work, `close()` at the end (or use `with`)."""

    def __init__(self, desc: str, total: int, unit: str, *, initial: int = 0, stream: IO[str] | None = None,
                 every_s: float = 10.0):
        self.desc, self.total, self.unit = desc, total, unit
        self.initial = self.n = initial
        self.fields: dict[str, object] = {}
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.started = time.monotonic()
        self.last_line: float | None = None  # when the last line was written
        self.last_state: tuple | None = None  # and what it said
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int, **fields: object) -> None:
        """`n` units of `total` are done; `fields` (reward, accuracy, ...) are shown beside the count."""
        self.n, self.fields = n, fields
        if self.bar is not None:
            self.bar.n = n
            self.bar.set_postfix({k: shown(v) for k, v in fields.items()}, refresh=False)
            self.bar.refresh()
        elif self.last_line is None or time.monotonic() - self.last_line >= self.every_s:
            self._write_line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last_state != (self.n, self.fields):
            self._write_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """`rlvr: 12/90 steps (13%), 5.9 s/step, 7m40s left, 1m11s elapsed | reward 0.41 accuracy 0.35 kl 0.0012`"""
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        percent = f" ({100 * self.n // self.total}%)" if self.total else ""
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s{percent}"]
        if rate >= 1:
            parts.append(f"{rate:.1f} {self.unit}s/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.1f} s/{self.unit}")
        if rate > 0 and self.n < self.total:
            parts.append(f"{duration((self.total - self.n) / rate)} left")
        parts.append(f"{duration(elapsed)} elapsed")
        text = ", ".join(parts)
        if self.fields:
            text += " | " + " ".join(f"{k} {shown(v)}" for k, v in self.fields.items())
        return text

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.last_line, self.last_state = time.monotonic(), (self.n, self.fields)


@contextmanager
def polling(poll: Callable[[], None], every_s: float = 1.0) -> Iterator[None]:
    """Call `poll` every `every_s` seconds from a thread while the body runs (a blocking call such as Ray Train's
    `fit` or a Ray Data write), and once more after the body ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    poll()
