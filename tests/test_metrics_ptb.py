"""The pure-Python PTB tokenizer against pycocoevalcap's Java ``PTBTokenizer``.

Pinned cases (observed from the Java tool) run everywhere; the generated-corpus comparisons call Java
and are marked ``parity``.
"""

from __future__ import annotations

import random
import shutil

import pytest

from vlkit.metrics import ptb

# (caption, what pycocoevalcap's PTBTokenizer returns for it), recorded from the real tool.
PINNED = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs' toys aren't cheap, they're \"premium\"!", "two dogs toys are n't cheap they 're premium"),
    ("It's a cat's toy (probably).", "it 's a cat 's toy -lrb- probably -rrb-"),
    ("A sign reads: 'STOP' -- really?!", "a sign reads stop really ?!"),
    ("He said \u201chello\u201d and \u2018bye\u2019.", "he said hello and bye"),
    ('"Quoted" text with "inner quotes" here', "quoted text with inner quotes here"),
    (
        "The U.S. flag, etc. and Dr. Who vs. no. 5 on St. Mark's.",
        "the u.s. flag etc. and dr. who vs. no. 5 on st. mark 's",
    ),
    ("the u.s. army and no. of dogs, no. 7", "the u.s. army and no of dogs no. 7"),
    (
        "A man's 1,000.5 dollars, 3/4 and 1 1/2 cups, \u00bd a pie.",
        "a man 's 1,000.5 dollars 3/4 and 1\u00a01/2 cups 1/2 a pie",
    ),
    ("Wow!!! Really?? What?! Huh!? ...", "wow !!! really ?? what ?! huh !?"),
    (
        "A black-and-white photo of a x-ray machine; mother-in-law.",
        "a black-and-white photo of a x-ray machine mother-in-law",
    ),
    ("and/or w/o 24/7 AT&T R&D at&t Q&A", "and/or w/o 24/7 at&t r&d at & t q&a"),
    ("cannot gonna wanna gotta lemme gimme 'tis 'twas", "can not gon na wan na got ta lem me gim me 't is 't was"),
    (
        "caf\u00e9 na\u00efve Z\u00fcrich \u00a0 zero\u200bwidth emoji \U0001f600 here",
        "caf\u00e9 na\u00efve z\u00fcrich zero width emoji here",
    ),
    ("[unk] <unk> {braces} (parens)", "-lsb- unk -rsb- <unk> -lcb- braces -rcb- -lrb- parens -rrb-"),
    ("a | b \\ c * d ^ e ~ f = g + h % i @ j # k $ l", "a | b \\ c * d ^ e ~ f = g + h % i @ j # k $ l"),
    ("price: $5, \u00a35, \u20ac5, 5\u00a2", "price $ 5 # 5 $ 5 5 cents"),
    ("a -- b --- c ---- d ----- e \u2013 f \u2014 g", "a b c d ----- e f g"),
    (
        "Mr. Smith and Mrs. Jones, Ph.D., from Calif. met Gen. Lee.",
        "mr. smith and mrs. jones ph.d. from calif. met gen. lee",
    ),
    ("I. A dog", "i a dog"),
    ("rock 'n' roll y'all o'clock '90s 'em", "rock 'n' roll y' all o'clock '90s 'em"),
    ("DON'T Won't CAN'T shouldn't", "do n't wo n't ca n't should n't"),
    ("tabs\tand  double  spaces", "tabs and double spaces"),
    ("", ""),
    ("...", ""),
    ("a dog\u2026 a cat. . . a bird....", "a dog a cat a bird"),
    ("12/25/2015 10:30 4:00pm 3.14 -5 +7 .5", "12/25/2015 10:30 4:00 pm 3.14 -5 +7 .5"),
    ("photo.jpg www.example.com foo@bar.com http://x.org/a", "photo.jpg www.example.com foo@bar.com http://x.org/a"),
    ("#tag @user c++ C# f#", "#tag @user c++ c# f#"),
    ("x\u00b2 H\u2082O \u00be \u2153", "x \u00b2 h \u2082 o 3/4 1/3"),
    ("A pizza\u2019s crust isn\u2019t burnt", "a pizza 's crust is n't burnt"),
    ("e.g. i.e. a.m. p.m.", "e.g. i.e. a.m. p.m."),
    ("Hello,world;foo:bar", "hello world foo bar"),
    ("&amp; &quot;x&quot; &lt;b&gt;", "& x < b >"),
]


@pytest.mark.parametrize(("caption", "expected"), PINNED)
def test_pinned_captions(caption: str, expected: str) -> None:
    assert ptb.tokenize(caption) == expected


def test_pinned_batch_equals_one_by_one() -> None:
    # These captions never look across a line end, so batching does not change them.
    captions = [c for c, _ in PINNED]
    assert ptb.tokenize_lines(captions) == [e for _, e in PINNED]


def test_lookahead_into_the_next_caption() -> None:
    # The Java tool scans all captions as one stream: a single-letter "acronym" before a sentence
    # opener such as "A " on the next line loses its period, otherwise it keeps it.
    assert ptb.tokenize_lines(["the letter b.", "A dog"]) == ["the letter b", "a dog"]
    assert ptb.tokenize_lines(["the letter b.", "a dog"]) == ["the letter b.", "a dog"]
    assert ptb.tokenize("the letter b.") == "the letter b."


@pytest.mark.parametrize("ch", ["\r", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\n"])
def test_line_breaks_inside_a_caption_are_spaces(ch: str) -> None:
    # Deliberate difference: the Java tool starts a new output line here and shifts later captions.
    assert ptb.tokenize_lines([f"a dog{ch}runs", "a cat"]) == ["a dog runs", "a cat"]


def test_next_line_is_not_a_line_break() -> None:
    # U+0085 is lexed as an ellipsis by the Java tool (no extra line), and dropped as punctuation.
    assert ptb.tokenize_lines(["a dog\x85runs", "a cat"]) == ["a dog runs", "a cat"]


def test_tokenize_captions_keeps_keys_and_order() -> None:
    out = ptb.tokenize_captions({7: ["A Dog.", "TWO cats!"], "x": ["It's red."]})
    assert out == {7: ["a dog", "two cats"], "x": ["it 's red"]}
    assert ptb.tokenize_lines([]) == []


def test_tag_spanning_two_captions_breaks_like_java() -> None:
    # A quoted attribute may contain the caption break; Java emits the tag as one token and its output
    # line breaks inside it, which keeps the later captions aligned.
    assert ptb.tokenize_lines(["<a b='x", "y'> z", "w"]) == ["<a\u00a0b='x", "y'> z", "w"]
    # An unclosed quote runs on, through whole captions (spaces become NBSP, nothing is split or dropped).
    captions = ["A <a href='x", "the dog. Etc", "z'> w, v.", "A cat."]
    expected = ["a <a\u00a0href='x", "the\u00a0dog.\u00a0etc", "z'> w v", "a cat"]
    assert ptb.tokenize_lines(captions) == expected


def test_raw_tokens_keep_punctuation() -> None:
    assert ptb.ptb_tokens(["It's (big)!", ""]) == [["it", "'s", "-lrb-", "big", "-rrb-", "!"], []]


def test_java_lowercasing_of_sigma() -> None:
    # Java decides final sigma by word (its BreakIterator), not by the neighbouring letter.
    assert ptb.tokenize("ΟΔΟΣ") == "οδος"
    assert ptb.tokenize("ΟΛΟΣ5pm") == "ολοσ5pm"
    assert ptb.tokenize("ABΣ_") == "abς _"


# ----------------------------------------------------------------------------------------------------
# Generated captions
# ----------------------------------------------------------------------------------------------------

_WORDS = (
    "a an the man woman dog cat sitting on of with and is are two red blue bus street table people group "
    "kids plate pizza food near its it they we you i he she"
).split()
_ABBREVIATIONS = (
    "U.S. U.K. etc. dr. Dr. no. No. vs. Mr. Mrs. Ms. St. Mt. Jan. Sept. Inc. Co. Corp. Ltd. Jr. Sr. e.g. i.e. "
    "a.m. p.m. approx. fig. Fig. ca. art. pp. op. al. Ph.D. Ave. Blvd. Rd. Ft. Gen. Col. Lt. Capt. Prof. "
    "Calif. Mass. Miss. miss. Tex. tex. Wash. Pa. La. Ill. ill. Del. Ark. Az. Pty. pty. co. esq. Bros. "
    "Mon. Tue. Fri. Dept. Mfg. Natl. Elec. a.k.a. cf. TREAS. Wm. Jos. Alex. Cie. Ed.D. est. ext. tel. sq. "
    "Bldg. seq. U.S.A. N.Y. D.C. A. B. I. Z. x. u.s. U.S.-U.K. non-U.S. nos. figs. prop. Sen. Rep. Gov."
).split()
_CONTRACTIONS = (
    "don't can't won't isn't it's he's she'd we're they've I'll you'd let's that's what's there's "
    "DON'T CAN'T Isn't cannot Cannot gonna gotta wanna lemme gimme 'tis 'twas 'Twas y'all o'clock O'Neil "
    "d'Artagnan l'amour rock'n'roll 'n' 'em '90s '80s 'til 'till 'cause ol' somethin' Dunkin' cont'd c'mon "
    "nor'easter e'er s'mores ev'ry li'l nat'l ain't shouldn't needn't dogs' James' "
    "don\u2019t it\u2019s can\u2019t o\u2019clock dogs\u2019 don`t it\u2018s"
).split()
_NUMBERS = (
    "0 1 42 100 1,000 1,000,000 3.5 .5 0.25 -5 +7 1/2 3/4 1 1/2 2-3 12/25/2015 1-2-2003 10:30 4:00pm 5pm "
    "1st 21st 100% $5 $5.99 US$ 555-1234 (555) 123-4567 555.123.4567 1990s 2x 1080p 1.2.3.4 007 "
    "\u00bd \u00bc \u00be \u2153 \u2154 \u215b 1\u00bd \u00b2 \u00b3 \u2082 H\u2082O "
    "5\u00a2 \u00a35 \u20ac10 \u00a5100 "
    "10-15 5'10 6'2\" 7\""
).split(" ")
_PUNCTUATION = [
    *".,;:!?",
    "!?",
    "?!",
    "!!!",
    "??",
    "...",
    "..",
    "....",
    ". . .",
    "\u2026",
    "--",
    "---",
    "-",
    "----",
    "-----",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    "<<",
    ">>",
    "/",
    "\\",
    "|",
    "&",
    "&&",
    "*",
    "**",
    "@",
    "#",
    "%",
    "^",
    "~",
    "_",
    "=",
    "+",
    "$",
    "`",
    "``",
    "'",
    "''",
    '"',
    "\u201c",
    "\u201d",
    "\u2018",
    "\u2019",
    "\u00ab",
    "\u00bb",
    "\u2039",
    "\u203a",
    "\u201e",
    "\u2013",
    "\u2014",
    "\u2015",
    "\u00b7",
    "\u2022",
    "\u00b0",
    "\u00d7",
    "\u00f7",
    "\u00b1",
    "\u00a7",
    "\u00a9",
    "\u00ae",
    "\u2122",
    "\u00bf",
    "\u00a1",
    "\\*",
    ":)",
    ";-)",
    ":(",
    ":D",
    "=]",
    "^_^",
    "(^_^)",
    "-_-",
    "(-.-)",
    "<3",
    "->",
    "=>",
    "\x7f",
    "\x00",
]
_OTHER = [
    "caf\u00e9",
    "na\u00efve",
    "Z\u00fcrich",
    "pi\u00f1ata",
    "\ufb01sh",
    "stra\u00dfe",
    "\u0391\u0392\u0393",
    "\u039f\u039b\u039f\u03a3",
    "\u041c\u043e\u0441\u043a\u0432\u0430",
    "\u65e5\u672c",
    "\U0001f600",
    "\U0001f44d\U0001f3fd",
    "\u2764\ufe0f",
    "\u00a0",
    "\u200b",
    "\u200e",
    "\ufeff",
    "\u2009",
    "\u3000",
    "\u00ad",
    "co\u00adop",
    "\u0130stanbul",
    "\u01c5",
    "e\u0301",
    "\u2044",
    "\u2010",
    "x\u2010y",
    "\x85",
    "\t",
    "&amp;",
    "&AMP;",
    "&quot;",
    "&apos;",
    "&lt;",
    "&gt;",
    "&nbsp;",
    "&mdash;",
    "&eacute;",
    "&#39;",
    "<unk>",
    "</s>",
    "<b>",
    "< b >",
    "<br/>",
    "<a href='x'>",
    "<!-- c -->",
    "[UNK]",
    "www.example.com",
    "google.com",
    "Google.com",
    "http://x.org/a_b",
    "https://a.b/c?d=e.",
    "foo@bar.com",
    "@user",
    "#tag",
    "c++",
    "C#",
    "AT&T",
    "R&D",
    "at&t",
    "S&P",
    "S&P-500",
    "Q&A",
    "and/or",
    "w/o",
    "he/she",
    "24/7",
    "photo.jpg",
    "IMG_1234.JPG",
    "index.html",
    "a.b.c",
    "co-ed",
    "x-ray",
    "mother-in-law",
    "pro-choice",
    "anti-",
    "-LRB-",
    "-rrb-",
    "C.D.s",
    "Cap'n",
    "c'est",
    "'96",
    "hello-",
    "-hello",
    "dog.,",
    "dog.;",
    "e.g.,",
    "U.S.,",
]
_SEPARATORS = [" "] * 12 + ["", "", "", "  ", "\t", "\n", "\u00a0"]
_CHAR_POOLS = [
    [chr(c) for c in range(32, 127)],
    list("aeiouyntsdlmrcgpxwqkjzAEIOUYNTSDLMRCGPXWQKJZ"),
    list("    "),
    list(
        "\u00a0\u00ad\u00bd\u2153\u2018\u2019\u201c\u201d\u2026\u2013\u2014\u00a3\u20ac\u00b2\u00e9\u03a3\u65e5\u200b\u0301\x85"
    ),
    list(".'\"-/&,;:!?()$#@*<>0123456789"),
]


def word_caption(rng: random.Random) -> str:
    """A caption-like string of words, abbreviations, contractions, numbers, symbols and unicode."""
    pieces = []
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        pool = (
            _WORDS
            if r < 0.35
            else _ABBREVIATIONS
            if r < 0.45
            else _CONTRACTIONS
            if r < 0.55
            else _NUMBERS
            if r < 0.65
            else _PUNCTUATION
            if r < 0.82
            else _OTHER
        )
        piece = rng.choice(pool)
        case = rng.random()
        piece = piece.capitalize() if case < 0.15 else piece.upper() if case < 0.2 else piece
        pieces += [piece, rng.choice(_SEPARATORS)]
    text = "".join(pieces)
    if rng.random() < 0.5:
        text += rng.choice([".", "!", "?", " .", "..", "...", "!?", ""])
    return text.capitalize() if rng.random() < 0.3 else text


def char_caption(rng: random.Random) -> str:
    """Random characters: stresses which token shapes win when symbols touch letters and digits."""
    weights = [4, 6, 3, 1, 3]
    return "".join(rng.choice(rng.choices(_CHAR_POOLS, weights)[0]) for _ in range(rng.randint(0, 40)))


_BOUNDARY_PIECES = [
    "<a b='", "'>", '<x y="', '">', "<b c=' d", "e'>", "I.", "b.", "U.S.", "etc.", "A", "The", "He", "Mr.", "<b>",
    "", " ", "no.", "5", "Jan.",
]  # fmt: skip


def boundary_caption(rng: random.Random) -> str:
    """Short captions built from pieces whose tokenisation depends on the *next* captions."""
    return " ".join(rng.choice(_BOUNDARY_PIECES) for _ in range(rng.randint(0, 4)))


def generated(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [word_caption(rng) if i % 2 == 0 else char_caption(rng) for i in range(n)]


def test_fast_path_equals_full_scan() -> None:
    for seed in range(3):
        stream = "\n".join(generated(seed, 400))
        assert ptb._scan(stream, fast=True) == ptb._scan(stream, fast=False)
    plain = "\n".join(["A dog runs", "cannot GONNA x", "a  b\tc", "Wanna go", "z"] * 3)
    assert ptb._scan(plain, fast=True) == ptb._scan(plain, fast=False)


def test_rule_dispatch_by_first_character_is_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    captions = generated(11, 300)
    fast = ptb.tokenize_lines(captions)
    every_rule = tuple(range(len(ptb._RULES)))
    monkeypatch.setattr(ptb, "_rules_starting_with", lambda ch: every_rule)
    assert ptb.tokenize_lines(captions) == fast


# ----------------------------------------------------------------------------------------------------
# Parity with the Java tool
# ----------------------------------------------------------------------------------------------------


def _java_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer, one image per caption, in order."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed; the PTB reference tokenizer needs it")
    tokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    out = tokenizer.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


@pytest.mark.parity
def test_matches_java_on_generated_captions(full: bool) -> None:
    captions = generated(2024, 20000 if full else 3000)
    rng = random.Random(7)
    for i in range(0, len(captions), 3):  # every third caption: pieces that look across caption ends
        captions[i] = boundary_caption(rng)
    ours = ptb.tokenize_lines(captions)
    theirs = _java_tokenize(captions)
    bad = [(c, o, t) for c, o, t in zip(captions, ours, theirs) if o != t]
    assert not bad, f"{len(bad)} of {len(captions)} differ, e.g. {bad[:3]}"


@pytest.mark.parity
def test_matches_java_on_pinned_and_cross_line_cases() -> None:
    captions = [c for c, _ in PINNED] + ["the letter b.", "A dog", "made in the U.S.", "The end", "x etc.", "Hi"]
    captions += ["ΟΔΟΣ", "ΟΛΟΣ5pm", "ABΣ_", "<a b='x", "y'> z", "w", '<p q="', '"> r', "s"]
    captions += ["A <a href='x", "the dog. Etc", "z'> w, v.", "A cat.", "I.", "<b c='d", "'> e"]
    assert ptb.tokenize_lines(captions) == _java_tokenize(captions)


@pytest.mark.parity
def test_line_break_characters_read_as_spaces_match_java_on_spaces() -> None:
    breaks = ["\r", "\u2028", "\u2029", "\x0b", "\x0c", "\r\n"]
    with_breaks = [f"A dog{b}runs etc.{b}The end" for b in breaks] + ["last one"]
    with_spaces = [" ".join(c.replace("\r\n", " ").split()) if c != "last one" else c for c in with_breaks]
    assert ptb.tokenize_lines(with_breaks) == _java_tokenize(with_spaces)
