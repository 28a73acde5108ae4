"""A run's start-up without the cyclic garbage collector's passes over what it loads.

Starting (or resuming) a run imports torch and the fireworks SDK (transformers too, when this
was measured; now only for a tokenizer other than the local service's own): some
290,000 objects the collector tracks, walked again and again as they pile up (five full
passes and hundreds of younger ones). The passes find almost nothing to free (a module's
objects live as long as the process) and took 0.45-0.6 s of a resume's 2.5-2.7 s of CPU
before its first step on this project's 2-core test machine (gc.callbacks; see
benchmarks/tracking_overhead.py's ``resume_to_next_step_s``).

So the start-up runs with the collector held off (``gc_paused``), and what it leaves is
frozen (gc.freeze), both by ``lasting``: the command's imports, then whatever the attempt
has set up (runner.loop.Attempt.run). The attempt unfreezes everything when it ends, and
the collector then sees it all again as usual: only the moment a piece of garbage made
during the start-up is collected moves (to the attempt's end at the latest), never what
is collected.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["gc_paused", "lasting"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic collection inside the block; nested blocks leave it to the outermost."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def lasting() -> Iterator[None]:
    """What the block makes (imports, a set-up) lives long: it is made with the collector held
    off, and frozen once made (module doc); a block that raises freezes nothing."""
    with gc_paused():
        yield
        gc.freeze()
