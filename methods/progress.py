"""Progress bars that read well on a terminal, in a CI log or a pipe, and on the web page.

On a terminal a bar redraws itself in place several times a second. Where the output is not a terminal (a log file,
a pipe, CI), every redraw is a new segment of text, so there a bar writes at most once every `NON_TTY_INTERVAL`
seconds (and once at the end). Code that wants to follow the work without a terminal, such as the web page, listens
with `observe`: every bar created inside it reports `(description, done, total)` as it advances, even when it is
not drawn.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

#: Seconds between two redraws of a bar whose output is not a terminal.
NON_TTY_INTERVAL = 5.0
TTY_INTERVAL = 0.1

Listener = Callable[[str, int, "int | None"], None]
_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("progress_listeners", default=())


def _is_terminal(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressBar(tqdm):
    """A tqdm bar that redraws rarely off a terminal and tells the listeners of `observe` how far it is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._listeners = _listeners.get()
        self._done = 0
        self._label = str(kwargs.get("desc") or "")
        iterable = args[0] if args else kwargs.get("iterable")
        self._total = kwargs.get("total") or (len(iterable) if hasattr(iterable, "__len__") else None)
        file = kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", TTY_INTERVAL if _is_terminal(file) else NON_TTY_INTERVAL)
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(*args, **kwargs)

    def _tell(self) -> None:
        for listener in self._listeners:
            listener(self._label, self._done, self._total)

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            self._tell()
            yield item
            self._done += 1
        self._tell()

    def update(self, n: float = 1) -> bool | None:
        self._done += int(n)
        self._tell()
        return super().update(n)


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> ProgressBar:
    """`tqdm(iterable, **kwargs)` that redraws at most every few seconds where stderr is not a terminal."""
    return ProgressBar(iterable, **kwargs)


@contextlib.contextmanager
def observe(listener: Listener) -> Iterator[None]:
    """Within this block (and this thread), every new progress bar calls `listener(description, done, total)`."""
    token = _listeners.set(_listeners.get() + (listener,))
    try:
        yield
    finally:
        _listeners.reset(token)
