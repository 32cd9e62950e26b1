"""Quota rules as plain values, in cost units: what a member may still ask for, and why not.

A unit is one 512×512 image denoised for 25 steps (`bot.requests.UNIT_WORK`); a request costs
images × pixels × steps really denoised in those units (`GenerationRequest.cost`), rounded to
thousandths. Sums and comparisons are made in whole thousandths (`milliunits`), the way the
ledger stores them, so 0.1 + 0.2 is exactly 0.3 here too."""

from __future__ import annotations

from dataclasses import dataclass

from bot.requests import GenerationRequest, denoising_steps

WINDOW_SECONDS = 24 * 60 * 60
MILLI = 1000  # the ledger counts thousandths of a unit


def milliunits(units: float) -> int:
    """Units in whole thousandths, as the ledger stores them, so sums never drift."""
    return round(units * MILLI)


def units_text(units: float) -> str:
    """A number of units as members read it: 32, 12.5, 0.125 (at most three decimals)."""
    return f"{units:.3f}".rstrip("0").rstrip(".")


def units_phrase(units: float) -> str:
    """A number of units with its noun: "1 unit", "12.5 units"."""
    shown = units_text(units)
    return f"{shown} unit" if shown == "1" else f"{shown} units"


def cost_text(request: GenerationRequest) -> str:
    """How a request's cost is made up: "4 images × 1024×1024 × 50 steps = 32 units"; from an
    init image only the steps really denoised count ("15 of 25 steps")."""
    images = f"{request.count} image" + ("" if request.count == 1 else "s")
    steps = denoising_steps(request.steps, request.strength)
    ran = f"{steps} steps" if steps == request.steps else f"{steps} of {request.steps} steps"
    return f"{images} × {request.width}×{request.height} × {ran} = {units_phrase(request.cost)}"


@dataclass(frozen=True)
class QuotaStatus:
    """A member's standing in the rolling 24-hour window, in units; a limit of 0 means
    unlimited."""

    limit: float
    used: float
    next_free_at: float | None
    exempt: bool = False

    @property
    def unlimited(self) -> bool:
        return self.exempt or self.limit == 0

    @property
    def left(self) -> float | None:
        if self.unlimited:
            return None
        return max(milliunits(self.limit) - milliunits(self.used), 0) / MILLI

    def allows(self, cost: float) -> bool:
        return self.unlimited or milliunits(self.used) + milliunits(cost) <= milliunits(self.limit)


class AdmissionRefused(Exception):
    """A request that is turned away before it is stored or charged."""


class QuotaExceeded(AdmissionRefused):
    def __init__(self, status: QuotaStatus, request: GenerationRequest) -> None:
        super().__init__(
            f"quota: {units_text(status.used)} of {units_text(status.limit)} units used, "
            f"asked for {units_text(request.cost)}"
        )
        self.status = status
        self.request = request

    @property
    def asked(self) -> float:
        return self.request.cost


class QuotaUsedUp(AdmissionRefused):
    """Nothing is left of the member's quota: refused before any work on the request, such
    as decoding its upload."""

    def __init__(self, status: QuotaStatus) -> None:
        super().__init__(f"quota: {units_text(status.used)} of {units_text(status.limit)} used")
        self.status = status


class TooManyQueued(AdmissionRefused):
    """The member already has `active` jobs queued or running, and `limit` is the most."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} jobs queued or running, the limit is {limit}")
        self.active = active
        self.limit = limit


class CostOverCap(AdmissionRefused):
    """One request costs more than a request may (MAX_REQUEST_COST), whatever the quota."""

    def __init__(self, request: GenerationRequest, cap: float) -> None:
        super().__init__(f"request costs {units_text(request.cost)}, cap {units_text(cap)}")
        self.request = request
        self.cap = cap


class MemberBanned(AdmissionRefused):
    def __init__(self, reason: str | None) -> None:
        super().__init__(f"banned: {reason or 'no reason given'}")
        self.reason = reason


class PromptBlocked(AdmissionRefused):
    def __init__(self, term: str, option: str = "prompt") -> None:
        super().__init__(f"blocked term in {option}: {term}")
        self.term = term
        self.option = option


class ShuttingDown(AdmissionRefused):
    def __init__(self) -> None:
        super().__init__("the bot is restarting")
