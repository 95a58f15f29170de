"""Counting XLA compilations, for tests that check a jitted function compiles once."""

import contextlib

import jax


@contextlib.contextmanager
def count_backend_compiles():
    """Count XLA backend compilations (jax.monitoring event) inside the block."""
    events: list[str] = []

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
