"""Quota rules as plain values: how many images a member may still ask for, and why not."""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_SECONDS = 24 * 60 * 60


@dataclass(frozen=True)
class QuotaStatus:
    """A member's standing in the rolling 24-hour window; a limit of 0 means unlimited."""

    limit: int
    used: int
    next_free_at: float | None
    exempt: bool = False

    @property
    def unlimited(self) -> bool:
        return self.exempt or self.limit == 0

    @property
    def left(self) -> int | None:
        return None if self.unlimited else max(self.limit - self.used, 0)

    def allows(self, images: int) -> bool:
        return self.unlimited or self.used + images <= self.limit


class AdmissionRefused(Exception):
    """A request that is turned away before it is stored or charged."""


class QuotaExceeded(AdmissionRefused):
    def __init__(self, status: QuotaStatus, asked: int) -> None:
        super().__init__(f"quota: {status.used} of {status.limit} used, asked for {asked}")
        self.status = status
        self.asked = asked


class MemberBanned(AdmissionRefused):
    def __init__(self, reason: str | None) -> None:
        super().__init__(f"banned: {reason or 'no reason given'}")
        self.reason = reason


class PromptBlocked(AdmissionRefused):
    def __init__(self, term: str) -> None:
        super().__init__(f"blocked term: {term}")
        self.term = term


class ShuttingDown(AdmissionRefused):
    def __init__(self) -> None:
        super().__init__("the bot is restarting")
