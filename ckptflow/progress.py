"""Progress of long work: a bar on the terminal, and listeners (the Prefect layer adds one that
updates a progress artifact) so the library never needs to know who is watching."""
from __future__ import annotations

import contextlib
import sys
import time

_LISTENERS: list = []   # callables(desc: str, done: float, total: float)


def add_listener(fn) -> None:
    _LISTENERS.append(fn)


def remove_listener(fn) -> None:
    if fn in _LISTENERS:
        _LISTENERS.remove(fn)


def notify(desc: str, done: float, total: float) -> None:
    for fn in list(_LISTENERS):
        fn(desc, done, total)


class _Bar:
    def __init__(self, total: float, desc: str, unit: str):
        from tqdm import tqdm

        self.total, self.desc, self.done = total, desc, 0.0
        self._tqdm = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=None,
                          file=sys.stderr, leave=False, dynamic_ncols=True)
        self._last = 0.0

    def __call__(self, n: float = 1, **postfix) -> None:
        self.done += n
        self._tqdm.update(n)
        if postfix:
            self._tqdm.set_postfix(postfix, refresh=False)
        now = time.monotonic()
        if _LISTENERS and (now - self._last > 0.5 or self.done >= self.total):
            self._last = now
            notify(self.desc, self.done, self.total)

    def close(self) -> None:
        self._tqdm.close()


@contextlib.contextmanager
def bar(total: float, desc: str, unit: str = "B"):
    b = _Bar(total, desc, unit)
    try:
        yield b
    finally:
        b.close()
