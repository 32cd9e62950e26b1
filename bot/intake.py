"""Who is asking, and where: the one value every entry point builds (a slash command, a button,
a modal, a reply, the context menu, the command line) and hands through the desk and the
service to the admission transaction, instead of a list of keyword arguments on each layer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.settings import Settings


@dataclass(frozen=True)
class Intake:
    """A request's origin: the member, the server whose rules apply (bans, blocklist, quota;
    None in a DM, where nothing is admitted), the channel and interaction to answer in, the
    member's fair-share `weight` and quota exemption (from their roles), whether results go
    to them privately, the image (job id, index) a variation starts from, and whether the
    channel is age-restricted (models marked `nsfw` work only there; a DM is not)."""

    member_id: int
    guild_id: int | None = None
    channel_id: int | None = None
    interaction_id: int | None = None
    parent: tuple[int, int] | None = None
    weight: float = 1.0
    exempt: bool = False
    private: bool = False
    age_restricted: bool = False

    def varying(self, job_id: int, index: int = 0) -> Intake:
        """The same origin, for a request that starts from image `index` of job `job_id`."""
        return replace(self, parent=(job_id, index))


@dataclass(frozen=True)
class AdmissionCaps:
    """The owner's limits that admission enforces in its transaction; 0 is no limit."""

    daily_quota: float = 0
    max_queued: int = 0
    max_cost: float = 0

    @classmethod
    def of(cls, settings: Settings) -> AdmissionCaps:
        return cls(settings.daily_quota, settings.max_queued_per_member, settings.max_request_cost)


def role_weight(settings: Settings, role_ids: Iterable[int]) -> float:
    """A member's fair-share weight: the largest of their roles' in ROLE_WEIGHTS, else 1."""
    weights = settings.role_weights
    return max([1.0, *(weights[role] for role in role_ids if role in weights)])


def quota_exempt(settings: Settings, role_ids: Iterable[int]) -> bool:
    """Whether one of the member's roles is in QUOTA_EXEMPT_ROLES (no daily quota)."""
    return not settings.quota_exempt_roles.isdisjoint(role_ids)
