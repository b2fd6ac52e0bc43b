"""Progress on stderr: a one-line bar when stderr is a terminal, silent otherwise or inside
``with quiet():`` (scoped: leaving the block restores what was there)."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Iterator

_QUIET = contextvars.ContextVar("onnxrep_quiet", default=False)


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No progress or log lines inside the block when ``on``."""
    token = _QUIET.set(_QUIET.get() or on)
    try:
        yield
    finally:
        _QUIET.reset(token)


def enabled() -> bool:
    return not _QUIET.get() and sys.stderr.isatty()


class Progress:
    """``with Progress(total, "calibrating") as bar: bar.update(n, loss=0.3)``."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.start = time.monotonic()
        self.on = enabled()

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        if not self.on:
            return
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in fields.items())
        elapsed = time.monotonic() - self.start
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            head = f"{self.desc} [{bar}] {self.done}/{self.total}"
        else:
            head = f"{self.desc} {self.done}"
        sys.stderr.write(f"\r{head} {elapsed:.1f}s {extra}".rstrip() + "\033[K")
        sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            sys.stderr.write("\n")
            sys.stderr.flush()


def log(message: str) -> None:
    """A status line on stderr when it is a terminal and not quiet."""
    if enabled():
        print(message, file=sys.stderr, flush=True)
