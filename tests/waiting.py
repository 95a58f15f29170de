"""Waiting on a condition with a deadline, for tests that watch other threads or processes."""

import time


def wait_until(condition, timeout: float, what: str) -> None:
    """Polls ``condition`` until it is true; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # the polling interval of a condition with a deadline, not a wait for an event
