"""What hostile members sent the bot in its safety reviews, kept as data: each case with what
a member must see. tests/test_hostile_corpus.py runs every case; add a case here whenever a
review finds one. An expectation is "queued" (a correct result) or a piece of the refusal."""

from __future__ import annotations

BLOCKED_TERMS = ("nude", "gore")

# /imagine's prompt, as typed.
PROMPTS: list[tuple[str, str]] = [
    ("a castle on a hill", "queued"),
    ("(nu:1)de", "blocks"),  # weights join the pieces the text encoder reads
    ("nu(:1)de", "blocks"),
    ("a photo of (nu:1.0)de woman", "blocks"),
    ("[nu]de", "blocks"),
    ("nu\\(de", "blocks"),  # an escaped bracket between the pieces
    ("nu BREAK de", "blocks"),
    ("{nu,xx}de", "blocks"),  # a permutation spells it
    ("{xx,nu}de", "blocks"),  # the second job spells it: the first is not queued either
    ("a nu\u0301de statue", "blocks"),  # a decomposed accent
    ("a nud\u0435 statue", "blocks"),  # a Cyrillic look-alike
    ("ｇｏｒｅ", "blocks"),  # full-width letters
    ("g o r e", "blocks"),
    ("a statue --no nu(:1)de", "negative prompt contains"),
    ("a classic car", "queued"),  # `ass` inside a word is no term
    ("(a:9e99)", "queued"),  # not a weight: text in brackets
    ("a (b:6)", "must be a number from 0 to 5"),
    ("(a:-1)", "must be a number from 0 to 5"),
    ("((((a)", "position"),
    ("{a,b}" * 9, "at most"),  # 512 permutations
    ("{" * 200 + "a", "inside a group"),
    ("a --repeat 999", "--repeat"),
    ("a --ar 0:0", "--ar"),
    ("a --ar 99999:1", "--ar"),
    ("a --seed 99999999999999999999", "seed"),
    ("a --steps -1", "steps"),
    ("a --count 99", "count"),
    ("a --scheduler ../../etc", "scheduler"),
    ("a --model ../../etc/passwd", "model"),
    ("a --lora x:1e309", "lora"),
    ("@everyone <@&1> a cat", "queued"),  # pings nobody: checked with the answer's mentions
    ("a" * 1600, "at most 1500"),
    ("\x00\x01\x02", "must not be empty"),
    ("a BREAK " * 40, "chunks"),
]

# /imagine's other options, with a harmless prompt.
OPTIONS: list[tuple[dict, str]] = [
    ({"steps": 10**40}, "steps"),
    ({"width": -8}, "width"),
    ({"width": 100}, "multiple of 8"),
    ({"height": 10**9}, "height"),
    ({"guidance": float("nan")}, "guidance"),
    ({"guidance": float("inf")}, "guidance"),
    ({"seed": 2**64}, "seed"),
    ({"count": 0}, "count"),
    ({"scheduler": "DPM++ 2M\u0000"}, "scheduler"),
    ({"strength": 0.5}, "only applies with an image"),
    ({"negative_prompt": "n" * 5000}, "negative_prompt"),
    ({"model": "x" * 64}, "model"),
    ({"lora": "a:1 " * 20}, "lora"),
]

# Button custom ids a client can send: each gets a private answer and touches nothing.
CUSTOM_IDS: list[str] = [
    "cancel:²",
    "cancel:٣",
    "cancel:" + "9" * 30,
    "cancel:-1",
    "reroll:" + "9" * 20,
    "reroll:0",
    "vary:1:٣:subtle",
    "vary:1:0:gentle",
    "vary:1:99:subtle",
    "op:1:0:explode",
    "op:1:0:../../x",
    "tools:1:-1",
    "forget-me:1",
    "nonsense",
    "x" * 100,
]

# models.toml texts the owner might write: "ok", or a piece of the one-line error.
MODELS_FILES: list[tuple[str, str]] = [
    ('default = "a"\n[models.a]\nsource = "tiny"\n', "ok"),
    ('default = "a"\n[models.a]\nsource = "tiny"\nsteps = "many"\n', "steps"),
    ('default = "b"\n[models.a]\nsource = "tiny"\n', "default"),
    ('default = "a"\n[models.a]\nsource = "tiny"\nsurprise = 1\n', "surprise"),
    ('default = "a"\n[models.a]\n', "source"),
    ("default = \n", "TOML"),
    ('default = "a"\n[models.a]\nsource = "tiny"\n[loras.x]\nsource = "tiny-lora"\n', "models"),
]
