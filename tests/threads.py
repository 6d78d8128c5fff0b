"""
Races in threads for the tests: a body run by several threads at once, with
the interpreter switching threads as often as it can.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


def race(work: Callable[[int], object], threads: int = 8) -> list[BaseException]:
    """
    Run ``work(0)`` ... ``work(threads - 1)`` at once, switching threads
    every microsecond; the exceptions they raised.
    """
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - the caller asserts on them
            errors.append(exc)

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        started = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join()
    finally:
        sys.setswitchinterval(before)
    return errors
