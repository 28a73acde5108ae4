"""The FireTitan-compatible local service: a real model on loopback.

Layout: ``supervisor`` starts and stops the server process; ``server`` is the web
app, whose requests pass ``gate`` (token, request log, error guard) and reach four
planes (``control_plane``, ``trainer_plane``, ``inference_plane``, and ``tinker_plane``:
the Tinker client's wire over the same engine); ``engine`` (Trainer, losses, state) and
``sampler`` run the model that ``model`` builds from the ``catalogue``; ``state`` is the state
dir's layout and records; ``wire`` the JSON shapes; ``cli`` the ``local`` commands.

Import-light on purpose: `catalogue` is plain data; the torch-backed parts
(`engine`, `sampler`, `model`) are imported only where needed, through
`load_engine`.
"""

from __future__ import annotations

import threading
from types import ModuleType

_IMPORT_LOCK = threading.Lock()
_ENGINE: ModuleType | None = None


def load_engine() -> ModuleType:
    """The engine module, imported once. Lazy, so the control plane and the CLI never
    need torch; locked, because transformers' lazy module is not safe to import from
    two threads at once (a warm-up thread and a trainer's worker)."""
    global _ENGINE
    if _ENGINE is None:
        with _IMPORT_LOCK:
            if _ENGINE is None:
                from . import engine
                from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: F401  (resolve the lazy names here)
                import peft  # noqa: F401  (LoRA trainers' library imports transformers modules: here, under the lock)
                _ENGINE = engine
    return _ENGINE
