"""Prompt blocklist matching that sees through spacing, punctuation, case, accents and
look-alike letters.

Text is NFKD-normalised (full-width letters become ASCII, accented letters a letter and its
marks), its combining marks are dropped (`nu\u0301de`, `nudé` and `nude` are one word), letters
of other scripts that look Latin are read as Latin (Cyrillic `о`, Greek `Ν`), then it is
case-folded and split into words of letters and digits. A term matches when consecutive words
of the prompt spell it exactly, so `n.s.f.w`, `N S F W` and `ｎｓｆｗ` match `nsfw`, while a word
that merely contains the term (`classic` for `ass`) does not.
"""

from __future__ import annotations

import re
import unicodedata

from bot.prompts import parse_weights
from bot.requests import GenerationRequest, InvalidRequest

_WORD = re.compile(r"[^\W_]+")
# Letters read as the Latin letter they look like, before case-folding, so that capitals map as
# they look (Greek `Ν` is N, its small `ν` is v).
_LOOKALIKE_ROWS = (
    ("АВСЕНІЈКМОРЅТХУҮ", "ABCEHIJKMOPSTXYY"),  # Cyrillic capitals
    ("асеһіјорѕухԁԛԝӏүькпг", "acehijopsyxdqwlybknr"),  # Cyrillic small letters
    ("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX"),  # Greek capitals
    ("αεηικνορτυχγωμ", "aenikvoptuxywu"),  # Greek small letters
    ("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢɡıȷɑ", "abcdefghijklmnoprstuvwyzgija"),  # Latin small capitals
)
_LOOKALIKES = str.maketrans(
    "".join(row for row, _ in _LOOKALIKE_ROWS), "".join(latin for _, latin in _LOOKALIKE_ROWS)
)
_MARKS = ("Mn", "Me")  # non-spacing and enclosing marks: accents, strike-throughs, circles


def _fold(text: str) -> str:
    """Idempotent, so stored terms can be folded again: small letters that case-folding makes
    (Greek `Γ` becomes `γ`) are mapped too."""
    decomposed = unicodedata.normalize("NFKD", text).translate(_LOOKALIKES)
    decomposed = decomposed.casefold().translate(_LOOKALIKES)
    bare = "".join(c for c in decomposed if unicodedata.category(c) not in _MARKS)
    return unicodedata.normalize("NFC", bare)


def words(text: str) -> list[str]:
    return _WORD.findall(_fold(text))


def normalize_term(term: str) -> str:
    """The key a term is stored and compared under: its words run together."""
    return "".join(words(term))


def find_blocked(prompt: str, normalized_terms: list[str]) -> str | None:
    """The first blocked term spelled by consecutive words of the prompt, or None. Terms are
    folded again, so rows stored before a folding rule was added still match."""
    if not normalized_terms:
        return None
    targets = {normalize_term(term) for term in normalized_terms} - {""}
    if not targets:
        return None
    longest = max(map(len, targets))
    tokens = words(prompt)
    for start in range(len(tokens)):
        joined = ""
        for token in tokens[start:]:
            joined += token
            if len(joined) > longest:
                break
            if joined in targets:
                return joined
    return None


def readings(text: str) -> list[str]:
    """The text as typed and as the text encoder reads it: weights, escapes and `BREAK`
    resolved, so `(nu:1)de` and `nu(:1)de` read `nude` (fragments of a chunk run together,
    chunks apart). Text that does not parse is refused by validation; it is read as typed."""
    try:
        chunks = parse_weights(text)
    except InvalidRequest:
        return [text]
    return [text, " ".join("".join(fragment.text for fragment in chunk) for chunk in chunks)]


def member_texts(request: GenerationRequest, model_prefix: str) -> dict[str, str]:
    """What the blocklist checks of a request, by option: the prompt and the member's own
    negative prompt (it is shown with the result too). The model's negative prefix is the
    owner's, not the member's: it is left out."""
    negative = request.negative_prompt
    if model_prefix and negative.startswith(model_prefix):
        negative = negative[len(model_prefix) :].removeprefix(", ")
    return {"prompt": request.prompt, "negative_prompt": negative}
