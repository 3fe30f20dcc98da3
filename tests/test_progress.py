"""Progress as a log file or `ray job logs` shows it: plain lines with the count, rate, time left and fields."""

from __future__ import annotations

import io
import re
import threading

from unifer_ray.progress import Progress, duration, polling


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_plain_lines_at_first_then_every_interval_and_at_the_end():
    log = io.StringIO()
    progress = Progress("rlvr", 90, "step", stream=log, every_s=3600)
    progress.update(1, reward=0.41234, accuracy=0.35, kl=0.0012, errors=0)
    for step in range(2, 90):
        progress.update(step, reward=0.5, accuracy=0.5, kl=0.001, errors=0)  # within the interval: no line
    progress.update(90, reward=0.75, accuracy=0.625, kl=0.002, errors=1)
    progress.close()

    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    first, last = text.splitlines()
    assert re.fullmatch(r"rlvr: 1/90 steps \(1%\), [\d.]+ (steps/s|s/step), \S+ left, \d+s elapsed"
                        r" \| reward 0\.4123 accuracy 0\.35 kl 0\.0012 errors 0", first), first
    assert re.fullmatch(r"rlvr: 90/90 steps \(100%\), [\d.]+ (steps/s|s/step), \d+s elapsed"
                        r" \| reward 0\.75 accuracy 0\.625 kl 0\.002 errors 1", last), last


def test_a_slow_resumed_run_shows_seconds_per_unit_and_the_time_left():
    progress = Progress("rlvr", 100, "step", initial=40, stream=io.StringIO())
    progress.started -= 60  # 60 s for the 10 steps since the resume
    progress.update(50)
    assert progress.line() == "rlvr: 50/100 steps (50%), 6.0 s/step, 5m00s left, 1m00s elapsed"
    assert duration(3725) == "1h02m" and duration(42) == "42s"


def test_on_a_terminal_progress_is_a_bar():
    screen = Terminal()
    with Progress("sft", 4, "step", stream=screen) as progress:
        progress.update(2, loss=1.5)
    assert "\r" in screen.getvalue()  # redrawn in place
    assert "2/4" in screen.getvalue() and "loss=1.5" in screen.getvalue()


def test_polling_runs_while_the_body_blocks_and_once_after_it():
    calls = []
    body_done = threading.Event()

    def poll():
        calls.append(body_done.is_set())

    with polling(poll, every_s=0.01):
        while len(calls) < 2:
            threading.Event().wait(0.01)
        body_done.set()
    assert calls[:2] == [False, False] and calls[-1] is True


def test_a_line_already_written_is_not_written_again_at_the_end():
    log = io.StringIO()
    with Progress("tiny", 5, "item", stream=log) as progress:
        progress.update(5, accuracy=0.4)
    assert log.getvalue().count("\n") == 1 and log.getvalue().startswith("tiny: 5/5 items (100%)")
