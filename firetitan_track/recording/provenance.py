"""Which recorded sample each trained datum came from, and how stale it was.

A sampled sequence is identified by a digest of its token ids (prompt + completion,
``SampledCompletion.full_tokens``). A datum is matched to it by the relation the cookbook
(``training/utils/rl/rollout/types.py``: ``rollout_to_prompt_group``; ``utils/distillation``)
and Tinker's next-token layout build every trained datum with::

    model_input   = tokens[:-1]
    target_tokens = tokens[1:]

so a datum whose targets are its inputs shifted by one trained on ``model_input + [target_tokens[-1]]``,
and that sequence's digest names the sample. A datum of any other layout (a multimodal
prompt, a preference pair built from a dataset) matches no sample, and says so by
counting as unmatched; nothing is guessed.

Staleness is counted in weight versions: a version is published each time new weights
are synced or hot-loaded onto the deployment the sample came from. A matched datum's
offset is the versions published before its optimizer step minus those published before
its sample was sent; a step's ``version_offsets`` are the min, max and mean over its matched
datums. This is how the cookbook's async recipe counts ``async/version_offset_*``
(trained-against version minus submit version, both in published versions).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["sequence_digest", "datum_sequence", "SampleRef", "SampleIndex", "version_offsets"]


def sequence_digest(tokens: Sequence[int]) -> str:
    """sha256 of the token ids as little-endian int64s."""
    packed = array("q", tokens)
    if sys.byteorder == "big":
        packed.byteswap()
    return hashlib.sha256(packed.tobytes()).hexdigest()


def _ints(value: object) -> list[int] | None:
    """Token ids from a TensorData (either SDK release), a tensor or array, or a list."""
    data = getattr(value, "data", value)
    if hasattr(data, "tolist"):
        data = data.tolist()
    if not isinstance(data, (list, tuple)):
        return None
    try:
        return [int(t) for t in data]
    except (TypeError, ValueError):
        return None


def datum_sequence(datum: Any) -> list[int] | None:  # an SDK Datum: its class differs by release
    """The sequence a next-token datum trains on (see the module docstring); None for a datum
    of another layout."""
    try:
        inputs = [int(t) for t in datum.model_input.to_ints()]
        targets = _ints(datum.loss_fn_inputs["target_tokens"])
    except Exception:  # image chunks, no target_tokens: not a sampled sequence
        return None
    if not inputs or targets is None or len(targets) != len(inputs) or targets[:-1] != inputs[1:]:
        return None
    return inputs + [targets[-1]]


@dataclass(frozen=True)
class SampleRef:
    """One sampled sequence as recorded: its SamplesDrawn event, its index in that call's
    completions, the deployment it came from and the weight versions published to it
    before the call was sent."""

    event_id: str
    index: int
    deployment: str
    version_at_send: int


class SampleIndex:
    """Sequence digest -> the recorded sample, for this process's samples (shared by its threads)."""

    def __init__(self) -> None:
        self._by_digest: dict[str, SampleRef] = {}
        self._lock = threading.Lock()

    def add(self, digests: Iterable[str], *, event_id: str, deployment: str, version_at_send: int) -> None:
        with self._lock:
            for i, digest in enumerate(digests):
                self._by_digest.setdefault(digest, SampleRef(event_id, i, deployment, version_at_send))

    def get(self, digest: str) -> SampleRef | None:
        return self._by_digest.get(digest)

    def __len__(self) -> int:
        return len(self._by_digest)


def version_offsets(offsets: Sequence[int]) -> dict[str, float] | None:
    """{min, max, mean} of the matched datums' offsets; None when no datum matched."""
    if not offsets:
        return None
    return {"min": min(offsets), "max": max(offsets), "mean": sum(offsets) / len(offsets)}
