"""The prompt blocklist: what it catches, what it lets through, and a refusal through Discord."""

import sqlite3

import pytest
from factories import make_request

from bot.blocklist import find_blocked, member_texts, normalize_term, readings

TERMS = [normalize_term(t) for t in ("nsfw", "gore", "bad word", "ass", "nude")]


@pytest.mark.parametrize(
    "prompt",
    [
        "an nsfw picture",
        "NSFW",
        "n.s.f.w art",
        "n s f w",
        "n-s-f-w",
        "ｎｓｆｗ poster",  # full-width letters
        "Ｎ．Ｓ．Ｆ．Ｗ",
        "lots of GORE!!!",
        "g_o_r_e",
        "a badword here",
        "a bad-word here",
        "b a d w o r d",
        "nsfw\u200b",  # zero-width space after the term
    ],
)
def test_evasions_are_caught(prompt):
    assert find_blocked(prompt, TERMS) is not None


@pytest.mark.parametrize(
    "prompt",
    [
        "a classic car at sunset",
        "a gorgeous landscape",
        "passage through the mountains",
        "news from wonderland",  # n,s,f,w are letters of other words
        "two bad words, or badwords, are not the phrase",
        "",
    ],
)
def test_innocent_near_misses_pass(prompt):
    assert find_blocked(prompt, TERMS) is None


def test_normalized_terms_run_words_together():
    assert normalize_term(" Bad  Word ") == "badword"
    assert normalize_term("Ｇｏｒｅ") == "gore"


@pytest.mark.parametrize(
    "prompt",
    [
        "a nu\u0301de statue",  # decomposed accent: u + combining acute
        "a nudé statue",  # precomposed accent
        "n\u0336u\u0336d\u0336e\u0336",  # combining strike-through on every letter
        "a nud\u0435 statue",  # Cyrillic е
        "\u0405\u0415X",  # Cyrillic capitals Ѕ and Е
        "g\u043er\u0435",  # Cyrillic о and е
        "\u039d\u0405FW",  # Greek capital Nu, Cyrillic Dze
        "n\u0455fw",  # Cyrillic small dze
        "\u0274\ua731\ua730\u1d21",  # Latin small capitals ɴꜱꜰᴡ
        "\u0274 \u0455 f w",  # look-alikes spelled out word by word
    ],
)
def test_accents_and_look_alike_letters_are_caught(prompt):
    terms = [*TERMS, normalize_term("sex")]
    assert find_blocked(prompt, terms) is not None, prompt


@pytest.mark.parametrize(
    "prompt",
    ["Привет, мир", "Καλημέρα κόσμε", "a café in Zürich", "crème brûlée", "日本の風景"],
)
def test_other_scripts_and_accented_words_pass(prompt):
    assert find_blocked(prompt, TERMS) is None


def test_terms_stored_before_accents_were_folded_still_match():
    # A row written by the older rule (NFKC only) keeps its accent; it is folded again.
    assert find_blocked("a nude statue", ["nudé"]) == "nude"
    assert normalize_term("Nu\u0301de") == normalize_term("ＮＵＤＥ") == "nude"


async def test_a_decomposed_accent_is_refused_through_discord(discord_world, imagine_bot):
    w = discord_world
    added = await w.fake.slash_command(
        w.mod, w.channel, "mod", {"term": "nude"}, subcommands=("blocklist", "add")
    )
    assert "Blocked `nude`" in (await added.wait_response()).content
    for prompt in ("a nu\u0301de statue", "a nud\u0435 statue"):
        refused = await (await imagine_bot.imagine(w.alice, prompt=prompt, seed=1)).wait_response()
        assert refused.ephemeral and "blocks" in refused.content, prompt


@pytest.mark.parametrize(
    "prompt",
    ["(nu:1)de", "nu(:1)de", "a photo of (nu:1.0)de woman", "[nu]de", "nu\\(de", "nu BREAK de"],
)
def test_the_blocklist_reads_what_the_text_encoder_reads(prompt):
    assert any(find_blocked(text, TERMS) for text in readings(prompt)), readings(prompt)


def test_the_models_own_negative_prefix_is_not_the_members():
    request = make_request(negative_prompt="nude, blurry, my own words")
    assert member_texts(request, "nude, blurry")["negative_prompt"] == "my own words"
    assert member_texts(request, "")["negative_prompt"] == "nude, blurry, my own words"


def blocked_rows(bot):
    with sqlite3.connect(bot.service.settings.database_path) as raw:
        return raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


@pytest.mark.parametrize(
    ("options", "which"),
    [
        ({"prompt": "(nu:1)de"}, "prompt"),
        ({"prompt": "a (nu:1.0)de statue --no blur"}, "prompt"),
        ({"prompt": "{nu,xx}de"}, "prompt"),
        ({"prompt": "{xx,nu}de"}, "prompt"),  # the second job is blocked: neither is queued
        ({"prompt": "a statue", "negative_prompt": "(nu:1)de"}, "negative prompt"),
        ({"prompt": "a statue --no nu(:1)de"}, "negative prompt"),
    ],
)
async def test_weights_and_permutations_do_not_hide_a_blocked_term(
    discord_world, imagine_bot, options, which
):
    w = discord_world
    added = await w.fake.slash_command(
        w.mod, w.channel, "mod", {"term": "nude"}, subcommands=("blocklist", "add")
    )
    assert "Blocked `nude`" in (await added.wait_response()).content
    refused = await (await imagine_bot.imagine(w.alice, seed=1, **options)).wait_response()
    assert refused.ephemeral and "contains a term this server blocks" in refused.content
    assert f"Your {which} contains" in refused.content
    assert blocked_rows(imagine_bot) == 0
