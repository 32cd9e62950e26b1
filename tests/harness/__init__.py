"""The real bot against the fake Discord, and reading what it answered.

In this process (`in_process`; fixtures `discord_world` and `imagine_bot` in conftest.py):

    async def test_panda(discord_world, imagine_bot):
        inter = await imagine_bot.imagine(discord_world.alice, prompt="a panda", seed=1)
        record = await imagine_bot.queued_job(inter)
        followup = await inter.wait_followup()

As `python -m bot` in a child process (`child_process`; see test_bot_process.py):

    process = BotProcess.start(fake, model_cache, workdir, MAX_SIZE="256")
    await process.wait_ready(fake)
    ...
    assert await process.stop() == 0

Reading the answers (`answers`): `job_id_of(text)`, `embed_field(message, "Seed")`.
"""
