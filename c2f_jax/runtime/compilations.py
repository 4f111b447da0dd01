"""Counts XLA compilations in this process, so tests and metrics can prove shapes stay static.

Every backend compile (persistent-cache hits included: a program was still built
for a new shape) emits JAX's backend-compile monitoring event; we tally it by
function name.
"""

from __future__ import annotations

import collections
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _EVENT:
        with _lock:
            _counts[kwargs.get("fun_name", "?")] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def total() -> int:
    """Compilations so far in this process."""
    return sum(_counts.values())


def by_name() -> dict[str, int]:
    """Compilations so far, by jitted function name."""
    return dict(_counts)
