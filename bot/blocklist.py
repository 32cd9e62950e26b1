"""Prompt blocklist matching that sees through spacing, punctuation, case and look-alike forms.

Text is NFKC-normalised (full-width letters become ASCII) and case-folded, then split into
words of letters and digits. A term matches when consecutive words of the prompt spell it
exactly, so `n.s.f.w`, `N S F W` and `ｎｓｆｗ` match `nsfw`, while a word that merely contains
the term (`classic` for `ass`) does not.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WORD.findall(folded)


def normalize_term(term: str) -> str:
    """The key a term is stored and compared under: its words run together."""
    return "".join(words(term))


def find_blocked(prompt: str, normalized_terms: list[str]) -> str | None:
    """The first blocked term spelled by consecutive words of the prompt, or None."""
    if not normalized_terms:
        return None
    targets = set(normalized_terms)
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
