"""The checks a request meets before any slow work on it, so that what can be refused
without the pixels is (a ban, a blocked term, a full queue, a used-up quota), and each
member's one decode at a time. Admission checks again, exactly, in its transaction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bot.blocklist import find_blocked, member_texts, readings
from bot.db import Store, admission, moderation, quotas
from bot.intake import AdmissionCaps, Intake
from bot.metrics import Metrics, counting_refusals
from bot.models import Catalog
from bot.quota import MemberBanned, PromptBlocked, QuotaUsedUp, TooManyQueued
from bot.requests import GenerationRequest
from bot.settings import Settings


class Gate:
    """Refusals before admission, counted in `metrics` by reason like admission's."""

    def __init__(
        self, settings: Settings, store: Store, catalog: Catalog, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.metrics = metrics
        self._decoding: dict[int, asyncio.Lock] = {}  # member id -> their one decode

    @counting_refusals
    async def check_member(self, intake: Intake, texts: dict[str, str] | None = None) -> None:
        """Raise MemberBanned, or PromptBlocked when a text the member typed (by option)
        spells a blocked term as typed or as the text encoder reads it, before any slow work
        on a request; admission checks the ban again, in its transaction."""
        guild, member = intake.guild_id or 0, intake.member_id
        if (ban := await self.store.read(moderation.ban_of, guild, member)) is not None:
            raise MemberBanned(ban.reason)
        texts = {option: text for option, text in (texts or {}).items() if text}
        if not texts:
            return
        terms = await self.store.read(moderation.blocked_keys, guild)
        for option, text in texts.items():
            for reading in readings(text):
                if term := find_blocked(reading, terms):
                    raise PromptBlocked(term, option)

    async def check_request(self, intake: Intake, request: GenerationRequest) -> None:
        """`check_member` on a checked request's prompt and the member's negative prompt."""
        prefix = self.catalog.models[request.model].negative_prompt
        await self.check_member(intake, member_texts(request, prefix))

    @counting_refusals
    async def check_room(self, intake: Intake) -> None:
        """Raise TooManyQueued or QuotaUsedUp when any request of the member's would be
        refused for those, before work that needs no pixels to be refused (decoding an
        upload); admission checks them again, exactly, in its transaction."""
        caps = AdmissionCaps.of(self.settings)
        active = await self.store.read(admission.active_jobs, intake.member_id)
        if caps.max_queued and active >= caps.max_queued:
            raise TooManyQueued(active, caps.max_queued)
        standing = await self.store.read(
            quotas.status,
            intake.guild_id,
            intake.member_id,
            default_limit=self.settings.daily_quota,
            exempt=intake.exempt,
        )
        if standing.left is not None and standing.left <= 0:
            raise QuotaUsedUp(standing)

    @contextlib.asynccontextmanager
    async def one_decode(self, member_id: int) -> AsyncIterator[None]:
        """Hold the member's one decode: their next upload waits here, off the decode pool,
        so one member never takes both of its threads from everyone else."""
        lock = self._decoding.setdefault(member_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._decoding.get(member_id) is lock:
                del self._decoding[member_id]
