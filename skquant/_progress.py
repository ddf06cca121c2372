"""Progress lines for long work (training, encoding, rankings) when verbose.

Pure Python, imports nothing of skquant.
"""

import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds):
    """Short human duration for progress lines.

    Examples
    --------
    >>> format_seconds(4.25), format_seconds(75), format_seconds(7300)
    ('4.2s', '1m15s', '2h01m')
    """
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Print ``[Name] <verb> 250000/1000000 items, elapsed 12.3s, left ~36.9s``.

    Silent unless ``verbose``; with ``verbose=1`` at most one line every
    ``interval`` seconds (plus the last one, when earlier ones were
    printed), with ``verbose >= 2`` one line per step. Work done in one
    step prints nothing: short calls stay quiet.

    Parameters
    ----------
    name : str
        Estimator name, in brackets.
    verb : str
        What is done to the items ("encoded", "ranked").
    total : int
        Number of items.
    verbose : int
    interval : float, default=2.0

    Examples
    --------
    >>> p = Progress("PQ", "encoded", 10, verbose=2)
    >>> p.update(4)  # doctest: +ELLIPSIS
    [PQ] encoded 4/10 items, elapsed ...s, left ~ ...s
    """

    def __init__(self, name, verb, total, verbose=0, interval=2.0):
        self.name, self.verb, self.total = name, verb, int(total)
        self.verbose = int(verbose or 0)
        self.interval = interval
        self.started = self._last = time.perf_counter()
        self.done = 0
        self._printed = False

    def update(self, n_items):
        """Record ``n_items`` more items done; print when due."""
        self.done += int(n_items)
        if not self.verbose:
            return
        now = time.perf_counter()
        finished = self.done >= self.total
        if finished and not self._printed and self.verbose < 2:
            return  # one quiet step, or quick work
        if self.verbose < 2 and not finished and now - self._last < self.interval:
            return
        elapsed = now - self.started
        left = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
        print(
            f"[{self.name}] {self.verb} {self.done}/{self.total} items, "
            f"elapsed {format_seconds(elapsed)}, left ~ {format_seconds(left)}",
            flush=True,
        )
        self._last = now
        self._printed = True
