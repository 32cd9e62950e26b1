"""Discord rate limits for status edits: one edit per message every few seconds, and a
shared budget across all messages, so a busy queue never trips a 429."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class EditThrottle:
    def __init__(
        self,
        *,
        per_message: float = 2.0,
        rate: float = 4.0,
        burst: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_message = per_message
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._refilled = clock()
        self._last_edit: dict[Hashable, float] = {}

    def allow(self, key: Hashable) -> bool:
        """True if `key` may be edited now; the caller then edits (the edit is counted)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        last = self._last_edit.get(key)
        if (last is not None and now - last < self._per_message) or self._tokens < 1:
            return False
        self._tokens -= 1
        self._last_edit[key] = now
        return True

    def forget(self, key: Hashable) -> None:
        self._last_edit.pop(key, None)
