import pytest

from bot.blocklist import find_blocked, normalize_term

TERMS = [normalize_term(t) for t in ("nsfw", "gore", "bad word", "ass")]


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
