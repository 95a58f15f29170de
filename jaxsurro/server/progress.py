"""Live status of a run: a tqdm bar in a terminal, plain periodic lines in a pipe or a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Shows samples received out of the study's total, with simulations, buffer, rates and loss."""

    def __init__(
        self,
        total_samples: int,
        *,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        line_interval: float = 5.0,
        enabled: bool = True,
    ):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.enabled = enabled
        self._line_interval = line_interval
        self._last_line = -float("inf")
        self._bar = None
        if enabled and self.interactive:
            self._bar = tqdm(
                total=total_samples, unit="sample", file=self.stream, dynamic_ncols=True, desc="received", smoothing=0.1
            )

    def update(self, received: int, status: dict[str, str], force: bool = False) -> None:
        """``status`` holds short already-formatted values (sims, buffer, samples/s, loss)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = received
            self._bar.set_postfix(status, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if force or now - self._last_line >= self._line_interval:
            self._last_line = now
            fields = "  ".join(f"{key} {value}" for key, value in status.items())
            print(f"[jaxsurro] received {received}  {fields}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
