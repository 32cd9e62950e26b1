"""The fake Discord against the real, unmodified discord.py client: a small bot logs in,
connects to the fake gateway and answers interactions and messages the driver plays."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands
from fakediscord import FakeDiscord, FakeGuild, FakeMember
from PIL import Image

from bot.discord_api import use_advertised_gateway, use_api_base

pytest_plugins = ["fakediscord.pytest_plugin"]


def png(color: str = "red", size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


ECHO_PNG = png("blue", (16, 12))


@dataclass
class Seen:
    """What the test bot's handlers received, for the test to check."""

    events: dict[str, Any] = field(default_factory=dict)
    messages: asyncio.Queue[discord.Message] = field(default_factory=asyncio.Queue)


class Panel(discord.ui.View):
    def __init__(self, seen: Seen) -> None:
        super().__init__(timeout=60)
        self.seen = seen

    @discord.ui.button(label="Again", custom_id="panel:again", style=discord.ButtonStyle.primary)
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.seen.events["clicked_by"] = interaction.user
        await interaction.response.edit_message(content="clicked!", view=None)


def make_bot(seen: Seen, *, message_content: bool = False) -> commands.Bot:
    intents = discord.Intents.default()
    intents.members = True
    intents.message_content = message_content
    bot = commands.Bot(command_prefix="!", intents=intents)

    @bot.tree.command(name="echo", description="Say it back, with a picture")
    async def echo(interaction: discord.Interaction, text: str, private: bool = False) -> None:
        if private:
            await interaction.response.send_message(text, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        await interaction.followup.send(text, file=discord.File(io.BytesIO(ECHO_PNG), "echo.png"))

    admin = app_commands.Group(name="admin", description="Server settings")
    quota = app_commands.Group(name="quota", description="Member quotas", parent=admin)

    @quota.command(name="set", description="Set a member's daily quota")
    async def quota_set(
        interaction: discord.Interaction,
        member: discord.Member,
        limit: int,
        image: discord.Attachment,
    ) -> None:
        seen.events["quota"] = (member, limit, image, await image.read())
        seen.events["permissions"] = (interaction.permissions, interaction.app_permissions)
        await interaction.response.send_message(f"{member.display_name}: {limit}/day")

    bot.tree.add_command(admin)

    @bot.tree.command(name="panel", description="Post a button")
    async def panel(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("panel", view=Panel(seen))

    @bot.tree.command(name="slow", description="Answers too late")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.4)
        try:
            await interaction.response.send_message("late")
        except discord.NotFound as exc:
            seen.events["slow_error"] = exc

    @bot.tree.command(name="pick", description="Choose from as many choices as typed")
    async def pick(interaction: discord.Interaction, flavour: str, note: str = "") -> None:
        await interaction.response.send_message(flavour, ephemeral=True)

    @pick.autocomplete("flavour")
    async def flavours(interaction: discord.Interaction, typed: str) -> list[app_commands.Choice]:
        count = int(typed) if typed.isdigit() else 1
        try:
            await interaction.response.autocomplete(
                [app_commands.Choice(name=f"flavour {i}", value=str(i)) for i in range(count)]
            )
        except discord.HTTPException as exc:
            seen.events["autocomplete_error"] = exc
        return []

    @bot.tree.context_menu(name="Vary")
    async def vary(interaction: discord.Interaction, message: discord.Message) -> None:
        seen.events["vary"] = message
        await interaction.response.send_message(f"varying {message.id}", ephemeral=True)

    @bot.listen("on_message")
    async def on_message(message: discord.Message) -> None:
        if not message.author.bot:
            seen.messages.put_nowait(message)

    return bot


@dataclass
class World:
    fake: FakeDiscord
    bot: commands.Bot
    seen: Seen
    guild: FakeGuild
    alice: FakeMember
    mod: FakeMember


async def connect(fake: FakeDiscord, bot: commands.Bot) -> asyncio.Task[None]:
    use_api_base(fake.api_base)
    await bot.login(fake.token)
    await use_advertised_gateway(bot)
    task = asyncio.create_task(bot.connect())
    await fake.wait_until_ready(5)
    return task


@pytest.fixture
def message_content() -> bool:
    """Whether the test bot asks for the message content intent (parametrize to change)."""
    return False


@pytest_asyncio.fixture
async def world(fake_discord: FakeDiscord, message_content: bool) -> AsyncIterator[World]:
    guild = fake_discord.add_guild("Test Server")
    alice = fake_discord.add_member(guild, "alice")
    mod = fake_discord.add_member(guild, "mod", moderator=True)
    seen = Seen()
    bot = make_bot(seen, message_content=message_content)
    task = await connect(fake_discord, bot)
    yield World(fake_discord, bot, seen, guild, alice, mod)
    await bot.close()
    await asyncio.wait_for(task, 5)


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


# ---- interactions -----------------------------------------------------------------------


async def test_defer_then_followup_with_png(world: World) -> None:
    fake = world.fake
    inter = await fake.slash_command(world.alice, world.guild.channel, "echo", {"text": "hello"})

    first = await inter.wait_response()
    assert first.type == 5
    assert first.at - inter.dispatched_at < 3

    followup = await inter.wait_followup(1)
    assert followup.content == "hello"
    [attachment] = followup.attachments
    assert attachment.filename == "echo.png"
    assert attachment.data == ECHO_PNG
    assert attachment.content_type == "image/png"
    assert (attachment.width, attachment.height) == (16, 12)
    assert await fetch(attachment.url) == ECHO_PNG
    downloads = [r for r in fake.requests if r.path.startswith("/attachments/")]
    assert [(r.method, r.status) for r in downloads] == [("GET", 200)]

    # Discord fills the "thinking" message with the first follow-up.
    original = await inter.original()
    assert original.id == followup.id and not original.loading and not original.ephemeral
    assert original.interaction_id == inter.id


async def test_ephemeral_reply_has_flag_64(world: World) -> None:
    inter = await world.fake.slash_command(
        world.alice, world.guild.channel, "echo", {"text": "psst", "private": True}
    )
    first = await inter.wait_response()
    assert (first.type, first.flags, first.ephemeral, first.content) == (4, 64, True, "psst")
    assert (await inter.original()).ephemeral


async def test_subcommand_group_with_member_and_attachment(world: World) -> None:
    image = png("green")
    inter = await world.fake.slash_command(
        world.mod,
        world.guild.channel,
        "admin",
        {"member": world.alice, "limit": 5},
        subcommands=("quota", "set"),
        attachments={"image": ("cat.png", image)},
    )
    reply = await inter.wait_response()
    assert reply.content == "Alice: 5/day"

    member, limit, attachment, data = world.seen.events["quota"]
    assert isinstance(member, discord.Member) and member.id == world.alice.id
    assert member.guild.id == world.guild.id
    assert limit == 5
    assert isinstance(attachment, discord.Attachment) and attachment.filename == "cat.png"
    assert attachment.content_type == "image/png" and (attachment.width, attachment.height) == (
        8,
        6,
    )
    assert data == image

    member_permissions, bot_permissions = world.seen.events["permissions"]
    assert member_permissions.manage_guild and not member_permissions.administrator
    assert bot_permissions.send_messages and bot_permissions.attach_files


async def test_button_click_edits_the_message(world: World) -> None:
    fake = world.fake
    inter = await fake.slash_command(world.alice, world.guild.channel, "panel")
    panel = await inter.original()
    assert panel.find_component("panel:again") is not None

    click = await fake.click_button(world.mod, panel, "panel:again")
    update = await click.wait_response()
    assert update.type == 7

    assert world.seen.events["clicked_by"].id == world.mod.id
    edited = await fake.wait_for_message(lambda m: m.id == panel.id and m.content == "clicked!")
    assert edited.components == [] and edited.edits[0].content == "panel"


async def test_message_context_menu_receives_target(world: World) -> None:
    fake = world.fake
    target = await fake.send_message(world.alice, world.guild.channel, "a cat in a hat")
    inter = await fake.message_command(world.mod, world.guild.channel, "Vary", target)
    assert (await inter.wait_response()).content == f"varying {target.id}"

    message = world.seen.events["vary"]
    assert isinstance(message, discord.Message)
    assert message.id == target.id and message.content == "a cat in a hat"
    assert message.author.id == world.alice.id


@pytest.mark.parametrize("fake_discord_options", [{"interaction_ack_timeout": 0.2}])
async def test_late_acknowledgement_is_refused(world: World) -> None:
    inter = await world.fake.slash_command(world.alice, world.guild.channel, "slow")
    await world.fake.wait_until(lambda: world.seen.events.get("slow_error"), 5, "the bot to fail")
    assert world.seen.events["slow_error"].code == 10062
    assert inter.responses == []
    assert [r.error["code"] for r in world.fake.rejected] == [10062]
    world.fake.rejected.clear()  # provoked on purpose


async def test_autocomplete_takes_only_choices_within_discords_limits(world: World) -> None:
    fake, channel = world.fake, world.guild.channel
    await world.bot.tree.sync()  # Discord asks only about options registered with autocomplete
    inter = await fake.autocomplete(world.alice, channel, "pick", {"flavour": "3"}, "flavour")
    assert [c["value"] for c in await inter.wait_choices()] == ["0", "1", "2"]
    assert inter.original_message_id is None  # choices make no message
    with pytest.raises(LookupError):
        await fake.autocomplete(world.alice, channel, "pick", {}, "note")

    await fake.autocomplete(world.alice, channel, "pick", {"flavour": "26"}, "flavour")
    await fake.wait_until(lambda: world.seen.events.get("autocomplete_error"), 5, "a refusal")
    assert (world.seen.events["autocomplete_error"].status, fake.rejected[0].status) == (400, 400)
    fake.rejected.clear()  # provoked on purpose


# ---- messages -------------------------------------------------------------------------------


async def test_reply_with_attachment_reaches_on_message(world: World) -> None:
    fake = world.fake
    inter = await fake.slash_command(world.alice, world.guild.channel, "echo", {"text": "base"})
    bot_message = await inter.wait_followup()

    reference = png("yellow")
    sent = await fake.send_message(
        world.alice,
        world.guild.channel,
        "more like this",
        reply_to=bot_message,
        attachments=[("ref.png", reference)],
    )
    received = await asyncio.wait_for(world.seen.messages.get(), 5)
    assert received.id == sent.id
    assert received.reference is not None and received.reference.message_id == bot_message.id
    assert isinstance(received.reference.resolved, discord.Message)
    # Without the message content intent the bot still sees a reply that pings it.
    assert received.content == "more like this"
    assert world.bot.user in received.mentions
    assert await received.attachments[0].read() == reference


async def test_content_is_hidden_without_intent_unless_mentioned(world: World) -> None:
    fake = world.fake
    await fake.send_message(world.alice, world.guild.channel, "just chatting")
    plain = await asyncio.wait_for(world.seen.messages.get(), 5)
    assert plain.content == ""

    await fake.send_message(world.alice, world.guild.channel, "draw a fox", mentions_bot=True)
    pinged = await asyncio.wait_for(world.seen.messages.get(), 5)
    assert pinged.content == f"<@{fake.bot_user_id}> draw a fox"


@pytest.mark.parametrize("message_content", [True])
async def test_content_is_visible_with_intent(world: World) -> None:
    await world.fake.send_message(world.alice, world.guild.channel, "just chatting")
    assert (await asyncio.wait_for(world.seen.messages.get(), 5)).content == "just chatting"


async def test_channel_send_reply_nonce_and_denied_channel(world: World) -> None:
    fake, bot = world.fake, world.bot
    channel = bot.get_channel(world.guild.channel.id)
    assert isinstance(channel, discord.TextChannel)

    user_message = await fake.send_message(
        world.alice, world.guild.channel, "hi", mentions_bot=True
    )
    await asyncio.wait_for(world.seen.messages.get(), 5)
    reply = await channel.send(
        "hello!", reference=channel.get_partial_message(user_message.id), nonce=1234
    )
    again = await channel.send("hello!", nonce=1234)  # enforce_nonce: Discord returns the first
    assert reply.id == again.id
    posted = await fake.wait_for_message(lambda m: m.id == reply.id)
    assert posted.reference == user_message.id and posted.nonce == "1234"
    assert world.alice.id in posted.mention_ids  # replies ping the author by default

    fake.deny_send(world.guild.channel)
    # Once this message is in, the CHANNEL_UPDATE before it was handled.
    await fake.send_message(world.alice, world.guild.channel, "sync", mentions_bot=True)
    await asyncio.wait_for(world.seen.messages.get(), 5)
    assert not channel.permissions_for(channel.guild.me).send_messages
    with pytest.raises(discord.Forbidden) as refused:
        await channel.send("nope")
    assert refused.value.code == 50013


async def test_too_long_content_is_rejected_like_discord(world: World) -> None:
    channel = world.bot.get_channel(world.guild.channel.id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as rejected:
        await channel.send("x" * 2001)
    assert (rejected.value.status, rejected.value.code) == (400, 50035)
    assert [r.status for r in world.fake.rejected] == [400]
    world.fake.rejected.clear()


async def test_direct_message(world: World) -> None:
    user = await world.bot.fetch_user(world.alice.id)
    sent = await user.send("your image is ready")
    message = await world.fake.wait_for_message(lambda m: m.content == "your image is ready")
    assert message.id == sent.id
    assert message.channel_id == world.fake.dm_channel(world.alice).id


# ---- gateway and REST plumbing --------------------------------------------------------------


@pytest.mark.parametrize("fake_discord_options", [{"heartbeat_interval_ms": 300}])
async def test_heartbeats_follow_the_interval(world: World) -> None:
    start = len(world.fake.heartbeats)
    await asyncio.sleep(2)
    beats = world.fake.heartbeats[start:]
    assert len(beats) >= 4
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert all(0.2 < gap < 0.5 for gap in gaps), gaps


async def test_gateway_is_zlib_stream_and_close_is_recorded(world: World) -> None:
    fake = world.fake
    [identify] = fake.identifies
    [query] = fake.gateway_connects
    assert query["compress"] == "zlib-stream" and query["v"] == "10"
    assert identify["token"] == fake.token and identify["intents"] == world.bot.intents.value
    await world.bot.close()
    closed = await fake.wait_for_close()
    # discord.py's close() sends 1000, but its receive loop wakes first and closes with 4000.
    assert closed.by_client and closed.code in (1000, 4000)


async def test_unknown_route_is_recorded(world: World) -> None:
    fake = world.fake
    route = discord.http.Route("GET", "/guilds/{guild_id}/bans", guild_id=world.guild.id)
    with pytest.raises(discord.NotFound):
        await world.bot.http.request(route)
    assert [(r.method, r.path) for r in fake.unknown_routes] == [
        ("GET", f"/guilds/{world.guild.id}/bans")
    ]
    assert fake.problems() == [f"unknown route: GET /guilds/{world.guild.id}/bans"]
    fake.unknown_routes.clear()


async def test_bad_token_is_refused() -> None:
    async with FakeDiscord() as fake:
        use_api_base(fake.api_base)
        client = discord.Client(intents=discord.Intents.default())
        with pytest.raises(discord.LoginFailure):
            await client.login("not-the-token")
        await client.close()
