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
        width = _width()
        self._tqdm = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=None,
                          file=sys.stderr, leave=False, dynamic_ncols=width is None, ncols=width)
        self._last = 0.0

    def __call__(self, n: float = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self._tqdm.set_postfix(postfix, refresh=False)
        self._tqdm.update(n)
        if self.done >= self.total:
            self._tqdm.refresh()    # the last state is drawn, however soon after the one before it came
        now = time.monotonic()
        if _LISTENERS and (now - self._last > 0.5 or self.done >= self.total):
            self._last = now
            notify(self.desc, self.done, self.total)

    def close(self) -> None:
        self._tqdm.close()


def _width() -> int | None:
    """None: follow the terminal's width; 80 where a terminal reports none (a pty with no size,
    as some CI runners and `docker exec -t` give), on which tqdm would draw an empty bar."""
    import os

    try:
        return None if os.get_terminal_size(sys.stderr.fileno()).columns else 80
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def bar(total: float, desc: str, unit: str = "B"):
    b = _Bar(total, desc, unit)
    try:
        yield b
    finally:
        b.close()


class StepLines:
    """Training progress as log lines, where no terminal shows the bar (a log file, a pipe):
    about `lines` of them over the run, plus every evaluation, every checkpoint and the last step.
    Call it with each metrics row (the trainer's on_metrics)."""

    def __init__(self, total: int, logger, lines: int = 20):
        self.total, self.logger, self.every = total, logger, max(1, total // lines)

    def __call__(self, row: dict) -> None:
        step = int(row.get("step") or 0)
        if not (step % self.every == 0 or step == self.total or row.get("checkpoint") or row.get("eval_loss") is not None):
            return
        self.logger.info("step %d/%d loss %s eval_loss %s lr %s tokens/s %s%s", step, self.total, _f(row.get("loss")),
                         _f(row.get("eval_loss")), _f(row.get("lr"), ".3g"), _f(row.get("tokens_per_s"), ".0f"),
                         f" checkpoint {row['checkpoint']}" if row.get("checkpoint") else "")


def _f(x, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"
