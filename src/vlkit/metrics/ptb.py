"""Pure-Python tokenizer that reproduces pycocoevalcap's ``PTBTokenizer`` without Java.

pycocoevalcap (the COCO caption scorer) writes every caption on its own line, runs Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` over the file, drops a fixed list of punctuation tokens and
joins the rest with single spaces. BLEU, ROUGE-L and CIDEr-D are computed on that output, so any
difference in tokenisation changes the scores. This module re-creates that pipeline in Python:

* a longest-match scanner (like the JFlex scanner it emulates): at every position each token shape that
  can start there is tried, the one covering the most text (including the text it peeks at after the
  token) wins, and ties go to the shape listed first;
* the normalisations the Java tool applies with its default options: ``(`` → ``-LRB-`` (and ``-RRB-``,
  ``-LCB-``, ``-RCB-``, ``-LSB-``, ``-RSB-``), straight and curly quotes → opening/closing quote tokens,
  ``…`` and ``. . .`` → ``...``, 3–4 hyphens and unicode dashes → ``--``, ``½`` → ``1/2``, ``£`` → ``#``,
  ``€`` → ``$``, ``¢`` → ``cents``, ``&amp;`` → ``&``, spaces inside fractions/phone numbers → NBSP,
  ``cannot``/``gonna``/``'tis`` split in two, clitics split off (``do n't``, ``it 's``), abbreviations
  (``U.S.``, ``etc.``, ``dr.``, ``no.`` before a number) keep their period, emoji and other
  untokenizable characters deleted;
* the captions are scanned as *one* stream joined by newlines, as the Java tool sees them, because a few
  shapes look past the end of a caption into the next one (a caption ending in ``letter b.`` loses the
  period only when the next caption starts with ``A``, ``The``, ``He``, ...; a tag with an unclosed
  quoted attribute, ``<a href='...``, swallows the following captions up to the next quote, and the
  Java output breaks that token at the caption ends — reproduced too);
* finally pycocoevalcap's own post-processing: lower-case (Java's rules, which differ from Python's for
  a capital sigma), split on ``" "``, drop :data:`PTB_PUNCTUATION`, join with ``" "``.

Known, deliberate differences from the Java pipeline:

* Line-breaking characters inside a caption (CR, U+2028, U+2029, VT, FF) make the Java tool emit an extra
  output line, which silently shifts every later caption onto the wrong image. Here they are treated as
  spaces, which is what the caption meant. (NEL, U+0085, does not shift lines in Java — it is lexed as an
  ellipsis — and is reproduced exactly.)
* Character classes ("is this a letter / digit / upper-case character") come from the Unicode tables of
  the installed ``regex`` module, the Java tool from the JDK it was generated with (2014). Characters
  assigned after that may be classified differently; none of them occur in ordinary captions.

Everything else, checked against the real tool on thousands of generated captions, matches exactly
(``tests/test_metrics_ptb.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import regex

__all__ = ["PTB_PUNCTUATION", "tokenize", "tokenize_lines", "tokenize_captions", "ptb_tokens"]

#: Tokens pycocoevalcap drops after tokenising (compared case-sensitively with the *lower-cased* tokens,
#: so ``-LRB-`` and friends never match and parentheses survive as ``-lrb-`` / ``-rrb-``).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_NEWLINE_TOKEN = "\n"  # internal marker: the scanner reached the end of a caption line

# ----------------------------------------------------------------------------------------------------
# Building blocks. The Java scanner is case-insensitive for literal text but case-sensitive inside
# character classes; ``_ci`` spells a literal out case-insensitively (ASCII only, as Java does for these).
# ----------------------------------------------------------------------------------------------------


def _ci(text: str) -> str:
    """A regex matching ``text`` with ASCII letters in either case and everything else literally."""
    out = []
    for ch in text:
        if ch.isascii() and ch.isalpha():
            out.append(f"[{ch.lower()}{ch.upper()}]")
        else:
            out.append(regex.escape(ch))
    return "".join(out)


def _alt(*parts: str) -> str:
    return "(?:" + "|".join(parts) + ")"


def _words(spec: str) -> str:
    """Alternation of case-insensitive words; ``[X]`` at the start of a word keeps that letter's case."""
    parts = []
    for word in spec.split():
        if word.startswith("[") and word[2] == "]":
            parts.append(regex.escape(word[1]) + _ci(word[3:]))
        else:
            parts.append(_ci(word))
    return _alt(*parts)


_SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = r"(?:\r?\n|\r|[\u2028\u2029\u000b\u000c\u0085])"
_SPACENL = _alt(_SPACE, _NEWLINE)
_SPACENLS = f"{_SPACENL}+"
_UPPER = r"\p{Uppercase}"
_LETTER_STRICT = r"\p{L}"  # what Java calls a letter
_DIGIT = r"[\p{Nd}\u07c0-\u07c9]"
_DIGIT_STRICT = r"\p{Nd}"
# Word characters: letters, plus combining marks and modifier letters of many scripts that the Java
# tool also accepts inside words, plus the soft hyphen (removed from the token afterwards), plus a few
# HTML entities for accented vowels.
_LETTER_CHARS = (
    r"\p{L}\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385"
    r"\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf"
    r"\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff"
    r"\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e"
    r"\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3"
    r"\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd"
    r"\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
)
_ACCENT_ENTITY = "&[aeiouAEIOU]" + _alt(_ci("acute"), _ci("grave"), _ci("uml")) + ";"
_LETTER = _alt(f"[{_LETTER_CHARS}]", _ACCENT_ENTITY)
_ALNUM = _alt(_LETTER, _DIGIT)
_ALNUM_STRICT = f"[{_LETTER_STRICT}{_DIGIT_STRICT}]"

_AMP_ENTITY = _ci("&amp;")
_APOS = _alt("['\u0092\u2019]", _ci("&apos;"))
_APOS_ANY = _alt(_APOS, "[`\u0091\u2018\u201b]")  # also the marks people type for an apostrophe
_HYPHEN = r"[\-_\u058a\u2010\u2011]"

_SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*"
    r"|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
    r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?"
    r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
)
_SENTENCE_START = _alt(_SPACENL, _UPPER, _SGML)  # after whitespace: what makes "etc." end a sentence
_NUM = _alt(f"{_DIGIT}+", f"{_DIGIT}*(?:[.:,\u00ad\u066b\u066c]{_DIGIT}+)+")
_WORD = f"{_LETTER}{_ALNUM}*(?:[.!?]{_LETTER}{_ALNUM}*)*"
_FILE_EXT = _words(
    "bat bmp c class cgi cpp dll doc docx exe gif gz h htm html jar java jpeg jpg mov mp3 pdf php pl png ppt ps "
    "py sql tar txt wav x xml zip"
)
_FILENAME = f"{_ALNUM}+(?:\\.{_ALNUM}+)*\\.{_FILE_EXT}"
_ELIDED = f"(?:[dDoOlL]{_APOS_ANY}{_ALNUM_STRICT})?"  # d'Artagnan, O'Neil, l'amour
_THING = f"{_ELIDED}{_ALNUM_STRICT}+(?:{_HYPHEN}{_ELIDED}{_ALNUM_STRICT}+)*"
_CAPS_AMP = f"[A-Z]+(?:(?:[+&]|{_AMP_ENTITY})[A-Z]+)+"  # AT&T, R&D (upper case only)
_SLASHED = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"  # and/or, w/o
_INITIALS_GROUPS = _alt(*(_ci(w) for w in ("canada", "sino", "korean", "eu", "japan", "non"))) + "-" + _ci("u.s")
_US_COMPOUND = _ci("u.s.-") + _alt(_ci("u.k"), _ci("u.s.s.r"))
_INITIALS = _alt(r"[A-Za-z](?:\.[A-Za-z])*", _INITIALS_GROUPS, _US_COMPOUND)  # U.S, e.g, A
_INITIALS2 = _alt(r"[A-Za-z](?:\.[A-Za-z])+", _INITIALS_GROUPS, _US_COMPOUND)  # at least two letters
_HYPHENATED = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_INITIALS2}\\.))+"
_CLITIC = _APOS + _alt("[msdMSD]", _ci("re"), _ci("ve"), _ci("ll"))  # 's 'm 'd 're 've 'll
_NEG_STEM = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"  # word before n't (cannot itself end in n)
_NEG_CLITIC = f"[nN]{_APOS_ANY}[tT]"
_APOSTROPHE_WORD = _alt(
    f"{_APOS}[nN]{_APOS}?",  # rock 'n' roll
    f"[lLdDjJ]{_APOS}",
    _ci("dunkin") + _APOS,
    _ci("somethin") + _APOS,
    _ci("ol") + _APOS,
    _APOS + _ci("em"),
    f"[A-HJ-XZn]{_APOS_ANY}{_LETTER_STRICT}{{2}}{_LETTER_STRICT}*",  # O'Brien, o'clock
    f"{_APOS}[2-9]0[sS]",  # '90s
    _APOS + _ci("til") + "[lL]?",
    f"{_LETTER_STRICT}{_LETTER_STRICT}*[aeiouyAEIOUY]{_APOS_ANY}[aeiouA-Z]{_LETTER_STRICT}*",
    _APOS + _ci("cause"),
    _ci("cont'd") + r"\.?",
    _ci("'twas"),
    _ci("nor'easter"),
    _ci("c'mon"),
    _ci("e'er"),
    _ci("s'mores"),
    _ci("ev'ry"),
    _ci("li'l"),
    _ci("nat'l"),
    f"[oO]{_APOS_ANY}[oO]",
)
_URL = _ci("http") + "[sS]?" + r"://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},\-]"
_URL_GUESS = (
    "(?:(?:" + _ci("www.") + r"(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
    r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2c-\x5f$]+\.)+" + _alt(*map(_ci, ("com", "net", "org", "edu"))) + "))"
    r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?"
)
_EMAIL = (
    "(?:" + _ci("&lt;") + r"|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@"
    r"(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+)(?:" + _ci("&gt;") + "|>)?"
)
_HANDLE = _alt("@[a-zA-Z_][a-zA-Z_0-9]*", f"#{_LETTER}+")

# Abbreviations. Group 1 is usually followed by a lower-case word (a sentence break is assumed before
# an upper-case one); group 2 by a capitalised name; group 3 only counts before a number.
_ABBREV_LOWER_NEXT = _alt(
    _words("Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec"),
    _words("Mon Tue Tues Wed Thu Thurs Fri"),
    _words(
        "Ala Ariz [A]z [A]rk Calif Colo Conn Ct Dak [D]el Fla Ga [I]ll Ind Kan Kans Ky [L]a [M]ass Md Mich Minn "
        "[M]iss Mo Mont Neb Nev Okla [O]re [P]a Penn Tenn [T]ex Va Vt [W]ash Wis Wisc Wyo"
    ),
    _words("Inc Co Cos Corp Ltd Plc Rt Bancorp Bhd Assn Univ Intl Sys"),
    "[pP](?:[pP])?[tT][ye][sS]?",  # Pty, Ptes
    _words("tel est ext sq"),
    _words("Jr Sr Bros Blvd Rd Esq"),
    _alt(_ci("ed"), _ci("ph")) + r"\." + "[dD]",  # Ed.D, Ph.D
    _words("etc al seq Bldg"),
)
_ABBREV1 = _ABBREV_LOWER_NEXT + r"\."
_TITLES = _words(
    "Mr Mrs Ms [M]iss Dr Drs Prof Profs Sen Sens Rep Reps Atty Attys Lt Col Gen Messrs Gov Govs Adm Rev Maj Sgt "
    "Cpl Pvt Capt St Ste Ave Pres Lieut Hon Brig Cmdr Comdr Pfc Spc Supt Supts Det Mt Ft Adj Adv Asst Assoc Ens "
    "Insp Mlle Mme Msgr Sfc"
)
_ABBREV_NAME_NEXT = _alt(
    _TITLES,
    _words("vs Alex Wm Jos Cie cf TREAS Ph"),
    _ci("a.k.a"),
    _INITIALS,
    _words("Invt Elec Natl Dept"),
    "[mM][ft][gG]",  # Mfg, Mtg
)
_ABBREV2 = _ABBREV_NAME_NEXT + r"\."
_ABBREV3 = _words("ca fig figs prop no nos art bldg pp op") + r"\."
_ACRONYM = _INITIALS + r"\."
# After an acronym, these words (case-sensitive first letter) start a new sentence.
_SENTENCE_OPENERS = _alt(
    _words(
        "[A]bout [A]ccording [A]dditionally [A]fter [A]n [A] [A]s [A]t [B]ut [E]arlier [H]e [H]er [H]ere "
        "[H]owever [I]f [I]n [I]t [L]ast [M]any [M]ore [N]ow [O]nce [O]ne [O]ther [O]ur [S]he [S]ince [S]o "
        "[S]ome [S]uch [T]hat [T]he [T]heir [T]hen [T]here [T]hese [T]hey [T]his [W]e [W]hen [W]hile [W]hat "
        "[Y]et [Y]ou"
    ),
    "M" + _ci("r") + r"\.",
    "M" + _ci("s") + r"\.",
    _SGML,
)
_PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])[0-9]{3,4}"
    r"[\- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
)
_DOUBLE_QUOTE = _alt('"', _ci("&quot;"))
_QUOTES = _alt(
    _APOS,
    "''",
    "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}",
)
_TREEBANK_SPECIAL = _alt(
    "-" + _alt(*map(_ci, ("rrb", "lrb", "rcb", "lcb", "rsb", "lsb"))) + "-",
    _ci("c.d.s"),
    _ci("pro-"),
    _ci("anti-"),
    "[sS]" + _alt("&", _AMP_ENTITY) + _ci("p-500"),
    "[sS]" + _alt("&", _AMP_ENTITY) + _ci("ls"),
    _ci("cap") + _APOS + "[nN]",
    "[cC]" + _APOS + _ci("est"),
)
_SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
_ASIAN_SMILEY = _alt(
    r"[\^x=~<>]\.\[\^[xX]=~<>\]",
    r"[\-\^x=~<>']_[\-\^x=~<>']",
    r"\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)",
    r"\([\^x=~<>']-[\^x=~<>'`]\)",
)
_MISC_SYMBOL = (
    "[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3"
    "\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d"
    "\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044"
    "\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
    "\uff3b-\uff40\uff5b-\uff65]"
)

# ----------------------------------------------------------------------------------------------------
# Token text normalisation
# ----------------------------------------------------------------------------------------------------

_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_OPENING_QUOTE = {"'": "`", '"': "``"}
_CLOSING_QUOTE = {"'": "'", '"': "''"}
_CURLY_QUOTE = {
    **dict.fromkeys("\u0091\u2018\u201b\u2039", "`"),
    **dict.fromkeys("\u0092\u2019\u203a", "'"),
    **dict.fromkeys("\u0093\u201c\u00ab", "``"),
    **dict.fromkeys("\u0094\u201d\u00bb", "''"),
}
_AMP_RE = regex.compile("(?i)&amp;")


def _latex_quotes(text: str, opening: bool) -> str:
    """Straight quotes become LaTeX-style open/close quotes by position; curly ones by their shape."""
    straight = _OPENING_QUOTE if opening else _CLOSING_QUOTE
    text = text.replace("&apos;", "'").replace("&quot;", '"')
    return "".join(straight.get(ch) or _CURLY_QUOTE.get(ch, ch) for ch in text)


def _drop_soft_hyphens(text: str) -> str:
    if "\u00ad" not in text:
        return text
    return text.replace("\u00ad", "") or "-"


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _brackets(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


# ----------------------------------------------------------------------------------------------------
# The scanner: one rule per token shape, in priority order.
# ----------------------------------------------------------------------------------------------------

# An action turns the matched token text into (tokens to emit, characters consumed). Consuming fewer
# characters than matched hands the rest back to the scanner (``cannot`` -> ``can`` + rescan ``not``).
Action = Callable[[str], tuple[tuple[str, ...], int]]


def _emit(fn: Callable[[str], str] = lambda t: t) -> Action:
    return lambda t: ((fn(t),), len(t))


def _keep_first(n: int) -> Action:
    return lambda t: ((t[:n],), n)


def _give_back(n: int) -> Action:
    return lambda t: ((t[:-n],), len(t) - n)


def _drop(t: str) -> tuple[tuple[str, ...], int]:
    return (), len(t)


def _abbreviation_then_period(t: str) -> tuple[tuple[str, ...], int]:
    # The abbreviation ends a sentence: emit it with its period, then scan the period again on its own.
    return (t,), len(t) - 1


def _acronym_before_sentence(t: str) -> tuple[tuple[str, ...], int]:
    if len(t) == 2:  # "I." / "b." before "The ...": a letter and a full stop
        return (t[0],), 1
    return (t,), len(t) - 1


def _bracket(name: str) -> Action:
    return lambda t: ((name,), len(t))


def _dashes(t: str) -> tuple[tuple[str, ...], int]:
    return (("--" if 3 <= len(t) <= 4 else t),), len(t)


@dataclass(frozen=True)
class _Rule:
    name: str
    pattern: str  # the token itself
    context: str | None = None  # text that must follow (counts for longest-match, not part of the token)
    action: Action = _emit()
    # May reach any number of lines ahead: a tag's quoted attribute (<a b='...'>) runs to the next quote.
    unbounded: bool = False


_RULES: tuple[_Rule, ...] = (
    _Rule("c++", _ci("c++")),
    _Rule("c#", "[cCfF]#"),
    _Rule("cannot", _ci("cannot"), action=_keep_first(3)),
    _Rule("'twas", _ci("'twas"), action=_keep_first(2)),
    _Rule("'tis", _ci("'tis"), action=_keep_first(2)),
    _Rule("gonna", _words("gonna gotta lemme gimme wanna"), action=_keep_first(3)),
    _Rule("sgml", _SGML, action=_emit(_nbsp), unbounded=True),
    _Rule(
        "mdash",
        _alt(_ci("&") + _words("MD mdash ndash") + ";", "[\u0096\u0097\u2013\u2014\u2015]"),
        action=_emit(lambda t: "--"),
    ),
    _Rule("&amp;", _AMP_ENTITY, action=_emit(lambda t: _AMP_RE.sub("&", t))),
    _Rule("entity", "&" + _alt(*map(_ci, ("ht", "tl", "ur", "lr", "qc", "ql", "qr", "odq", "cdq")), "#[0-9]+") + ";"),
    _Rule("word+clitic", _WORD, _CLITIC, _emit(_drop_soft_hyphens)),
    _Rule("word+n't", _NEG_STEM, _NEG_CLITIC, _emit(_drop_soft_hyphens)),
    _Rule("word", _WORD, action=_emit(_drop_soft_hyphens)),
    _Rule("apostrophe word", _APOSTROPHE_WORD),
    _Rule("y'", "[yY]" + _APOS, _LETTER_STRICT),
    _Rule("url", _URL),
    _Rule("url guess", _URL_GUESS),
    _Rule("email", _EMAIL),
    _Rule("handle", _HANDLE),
    _Rule("clitic", _CLITIC, "[^A-Za-z]", _emit(lambda t: _latex_quotes(t, False))),
    _Rule("n't", _NEG_CLITIC, "[^A-Za-z]", _emit(lambda t: _latex_quotes(t, False))),
    _Rule("date", f"{_DIGIT}{{1,2}}[\\-/]{_DIGIT}{{1,2}}[\\-/]{_DIGIT}{{2,4}}"),
    _Rule("number", f"[\\-+]?{_NUM}", action=_emit(_drop_soft_hyphens)),
    _Rule(
        "super/subscript number",
        "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
    ),
    _Rule(
        "fraction",
        f"(?:{_DIGIT}{{1,4}}[\\- \u00a0])?{_DIGIT}{{1,4}}(?:\\\\?/|\u2044){_DIGIT}{{1,4}}",
        action=_emit(_nbsp),
    ),
    _Rule("vulgar fraction", "[\u00bc\u00bd\u00be\u2153-\u215e]", action=_emit(lambda t: _FRACTIONS.get(t, t))),
    _Rule("treebank special", _TREEBANK_SPECIAL, action=_emit(lambda t: _AMP_RE.sub("&", t))),
    _Rule("slashed", _SLASHED),
    _Rule("dollar", r"(?:[A-Z]*\$|#)"),
    _Rule(
        "currency",
        "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        action=_emit(lambda t: _CURRENCY.get(t, t)),
    ),
    _Rule(
        "acronym+sentence",
        _ACRONYM,
        f"{_SPACENLS}{_SENTENCE_OPENERS}{_SPACENL}",
        _acronym_before_sentence,
        unbounded=True,
    ),
    _Rule("abbrev before number", _ABBREV3, f"{_SPACENL}?{_DIGIT_STRICT}"),
    _Rule("pty. ltd.", "(?:[pP][tT][eyEY]|[cC][oO])\\.", _SPACE + _alt(_ci("ltd"), _ci("lim"))),
    _Rule("abbrev+sentence", _ABBREV1, _SPACENL + _SENTENCE_START, _abbreviation_then_period, unbounded=True),
    _Rule("abbrev", _ABBREV1, r"[\s\S][\s\S]"),
    _Rule("abbrev at end", _ABBREV1, action=_abbreviation_then_period),
    _Rule("title abbrev", _ABBREV2),
    _Rule("title", _ABBREV_NAME_NEXT, _SPACE),
    _Rule("initials", _INITIALS, _SPACENL),
    _Rule("'90", _APOS + "[0-9][0-9]", _SPACENL),
    _Rule("filename", _FILENAME, _alt(_SPACENL, "[.?!,]")),
    _Rule("word.", _WORD + r"\.", "[,;:\u3001]", _emit(_drop_soft_hyphens)),
    _Rule("phone", _PHONE, action=_emit(lambda t: _brackets(_nbsp(t)))),
    _Rule("opening double quote", _DOUBLE_QUOTE, "[A-Za-z0-9$]", _emit(lambda t: _latex_quotes(t, True))),
    _Rule("double quote", _DOUBLE_QUOTE, action=_emit(lambda t: _latex_quotes(t, False))),
    _Rule("delete", "\x7f", action=_drop),
    _Rule("<", _alt("<", _ci("&lt;")), action=_emit(lambda t: "<")),
    _Rule(">", _alt(">", _ci("&gt;")), action=_emit(lambda t: ">")),
    _Rule("smiley", _SMILEY, "[^A-Za-z0-9]", _emit(_brackets)),
    _Rule("asian smiley", _ASIAN_SMILEY, action=_emit(_brackets)),
    _Rule("{", r"\{", action=_bracket("-LCB-")),
    _Rule("}", r"\}", action=_bracket("-RCB-")),
    _Rule("[", r"\[", action=_bracket("-LSB-")),
    _Rule("]", r"\]", action=_bracket("-RSB-")),
    _Rule("(", r"\(", action=_bracket("-LRB-")),
    _Rule(")", r"\)", action=_bracket("-RRB-")),
    _Rule("hyphens", r"-+", action=_dashes),
    _Rule("ellipsis", r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", action=_emit(lambda t: "...")),
    _Rule("marks", "@+|#+|_+"),
    _Rule("asterisks", r"\*+|(?:\\\*){1,3}"),
    _Rule("comma", "[,;:\u3001]"),
    _Rule("!?", "[?!]+"),
    _Rule("full stop", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    _Rule("=", "="),
    _Rule("/", "/"),
    _Rule("hyphenated.", _HYPHENATED + r"\.", "[,;:\u3001]", _emit(_drop_soft_hyphens)),
    _Rule("hyphenated", _HYPHENATED, action=_emit(_drop_soft_hyphens)),
    _Rule("thing.", _THING + r"\.", "[,;:\u3001]"),
    _Rule("thing", _THING),
    _Rule("caps&caps.", _CAPS_AMP + r"\.", "[,;:\u3001]", _emit(lambda t: _AMP_RE.sub("&", t))),
    _Rule("caps&caps", _CAPS_AMP, action=_emit(lambda t: _AMP_RE.sub("&", t))),
    _Rule("opening single quote", "'", "[A-Za-z][^ \t\n\r\u00a0]", _emit(lambda t: _latex_quotes(t, True))),
    _Rule("clitic at end", _CLITIC, action=_emit(lambda t: _latex_quotes(t, False))),
    _Rule("n't at end", _NEG_CLITIC, action=_emit(lambda t: _latex_quotes(t, False))),
    _Rule("quotes", _QUOTES, action=_emit(lambda t: _latex_quotes(t, False))),
    _Rule("<<", "<<|>>"),
    _Rule("symbol", _MISC_SYMBOL),
    _Rule("space", "\x00|" + _SPACE + "+|[\u200b\u200e\u200f\ufeff]", action=_drop),
    _Rule("newline", _NEWLINE, action=_emit(lambda t: _NEWLINE_TOKEN)),
    _Rule("&nbsp;", _ci("&nbsp;"), action=_drop),
    _Rule("untokenizable", "[^\n]", action=_drop),
)

_FLAGS = regex.POSIX | regex.VERSION0  # POSIX: each rule reports its *longest* match, as a lexer needs
_COMPILED = tuple(
    regex.compile(f"(?P<tok>{r.pattern})" + (f"(?:{r.context})" if r.context else ""), _FLAGS) for r in _RULES
)
_STARTS = tuple(regex.compile(f"(?:{r.pattern})", _FLAGS) for r in _RULES)
_UNBOUNDED = tuple(r.unbounded for r in _RULES)


@functools.lru_cache(maxsize=4096)
def _rules_starting_with(ch: str) -> tuple[int, ...]:
    """Indices of the rules whose token can begin with ``ch`` (a pure speed-up; checked in tests)."""
    return tuple(i for i, start in enumerate(_STARTS) if start.match(ch, partial=True))


# Fast path: an ASCII word followed by a space or line end is always a token of its own, unless it is one
# of the words the scanner splits in two. A run of such words is taken in one step. Equivalence with the
# full scan is tested.
_BLANKS = regex.compile(_SPACE + "+")
_PLAIN_WORDS = regex.compile(r"[A-Za-z]+(?: +[A-Za-z]+)*(?=[ \n]|\Z)")
_NOT_PLAIN = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


_NOT_BLANK = regex.compile(r"[^ \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\u000b\u000c\u0085]")


def _window_end(text: str, pos: int) -> tuple[int, int]:
    """End of the line holding ``pos`` and how far a token starting on it may need to look.

    Apart from the few rules marked ``unbounded`` (tags with quoted attributes), a match never looks past
    the next non-blank line (``U.S.`` / ``etc.`` peek at the next word). Bounding the match window keeps
    each regex attempt independent of the stream length (the ``regex`` engine scans ahead for characters
    a pattern requires).
    """
    line_end = text.find("\n", pos)
    if line_end < 0:
        return len(text), len(text)
    nxt = _NOT_BLANK.search(text, line_end + 1)
    if nxt is None:
        return line_end, len(text)
    nxt_end = text.find("\n", nxt.start())
    return line_end, len(text) if nxt_end < 0 else min(len(text), nxt_end + 2)


def _scan(text: str, fast: bool = True) -> list[str]:
    """Split ``text`` into raw (not yet lower-cased) tokens; ``_NEWLINE_TOKEN`` marks line ends.

    Args:
        text: the newline-joined captions.
        fast: take the plain-word shortcut (the reference path, ``fast=False``, tries every rule).
    """
    tokens: list[str] = []
    pos, end = 0, len(text)
    line_end, window = -1, 0
    while pos < end:
        if pos > line_end:
            line_end, window = _window_end(text, pos)
        ch = text[pos]
        if ch == " ":  # a run of blanks is one (dropped) token; nothing else can start with a space
            pos = _BLANKS.match(text, pos, window).end()
            continue
        if fast:
            m = _PLAIN_WORDS.match(text, pos, window)
            if m is not None:
                words = m.group().split()
                if _NOT_PLAIN.isdisjoint(w.lower() for w in words):
                    tokens.extend(words)
                    pos = m.end()
                    continue
        best_len, best_rule, best_text = -1, -1, ""
        for i in _rules_starting_with(ch):
            m = _COMPILED[i].match(text, pos, end if _UNBOUNDED[i] else window)
            if m is not None and m.end() - pos > best_len:
                best_len, best_rule, best_text = m.end() - pos, i, m.group("tok")
        emitted, consumed = _RULES[best_rule].action(best_text)
        tokens.extend(emitted)
        pos += consumed
    return tokens


# Characters that would start a new output line in the Java tool (and so shift later captions to the
# wrong image); vlkit reads them as the spaces they stand for.
_LINE_BREAKS = regex.compile("[\n\r\u2028\u2029\u000b\u000c]")
_ASTRAL = regex.compile("[\U00010000-\U0010ffff]")


def _as_java_chars(text: str) -> str:
    """Java scans UTF-16 code units: a character outside the BMP is two surrogate units (each deleted)."""
    return _ASTRAL.sub(lambda m: _surrogates(m.group()), text)


def _surrogates(ch: str) -> str:
    code = ord(ch) - 0x10000
    return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


_SURROGATE_PAIR = regex.compile("[\ud800-\udbff][\udc00-\udfff]")
_LONE_SURROGATE = regex.compile("[\ud800-\udfff]")


def _from_java_chars(token: str) -> str:
    """Re-join surrogate pairs kept inside a token; Java writes a lone surrogate as ``?``."""
    if not _LONE_SURROGATE.search(token):
        return token
    token = _SURROGATE_PAIR.sub(lambda m: chr(0x10000 + ((ord(m[0][0]) - 0xD800) << 10) + ord(m[0][1]) - 0xDC00), token)
    return _LONE_SURROGATE.sub("?", token)


# A "word" as Java's word BreakIterator sees it: letter runs joined by - _ ' " . , number
# runs joined by , . ' and any alternation of the two ("ΟΛΟΣ5pm" is one word, "KGΣ3_n" is two).
# (Han, katakana and hiragana are words of their own there.)
_JAVA_LETTERS = r"[[\p{L}\p{M}\p{Cf}]--[\u3005\u4e00-\u9fa5\uf900-\ufa2d\u3099-\u309c\u30a1-\u30fe\u3041-\u309e]]+"
_JAVA_WORD = regex.compile(
    rf"(?:{_JAVA_LETTERS}(?:[\p{{Pd}}\p{{Pc}}\u00ad\u2027\"'.]{_JAVA_LETTERS})*|\p{{N}}+(?:[\"',\u066b.]\p{{N}}+)*)+",
    regex.V1,
)


def _java_lower(token: str) -> str:
    """``str.lower`` as Java's ``toLowerCase`` does it, which differs only for capital sigma.

    Java writes a final sigma (``ς``) when a cased letter precedes it and none follows it *within the same
    word* (by its word BreakIterator); Python looks only at the neighbouring letters.
    """
    if "\u03a3" not in token:
        return token.lower()
    chars = [c.lower() for c in token]  # per character, so positions line up with the token
    for run in _JAVA_WORD.finditer(token):
        word = run.group()
        for i, ch in enumerate(word):
            if ch == "\u03a3":
                cased_before = any(c.lower() != c.upper() for c in word[:i])
                cased_after = any(c.lower() != c.upper() for c in word[i + 1 :])
                chars[run.start() + i] = "\u03c2" if cased_before and not cased_after else "\u03c3"
    return "".join(chars)


def ptb_tokens(texts: Sequence[str]) -> list[list[str]]:
    """Tokenise captions as the Java PTBTokenizer does, before pycocoevalcap's punctuation filter.

    Args:
        texts: captions, one per output line; scanned as one newline-joined stream like the Java tool.

    Returns:
        For every caption its lower-cased tokens, punctuation included.
    """
    if not texts:
        return []
    stream = "\n".join(_LINE_BREAKS.sub(" ", t) for t in texts)
    astral = _ASTRAL.search(stream) is not None
    if astral:
        stream = _as_java_chars(stream)
    lines: list[list[str]] = [[]]
    for tok in _scan(stream):
        if tok == _NEWLINE_TOKEN:
            lines.append([])
            continue
        tok = _java_lower(_from_java_chars(tok) if astral else tok)
        # Only a tag with a quoted attribute (<a b='x ... y'>) can swallow a caption break. The Java tool
        # writes such a token as is, so its output lines break inside the token; do the same.
        first, *rest = tok.split("\n")
        lines[-1].append(first)
        lines.extend([part] for part in rest)
    return lines


def _coco_line(tokens: list[str]) -> str:
    # pycocoevalcap: ' '.join(w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS)
    line = " ".join(tokens).rstrip()
    return " ".join(w for w in line.split(" ") if w not in PTB_PUNCTUATION)


def tokenize_lines(texts: Sequence[str]) -> list[str]:
    """Tokenise captions exactly as pycocoevalcap's PTBTokenizer would if each were one line of its input.

    Args:
        texts: captions in the order pycocoevalcap would write them.

    Returns:
        One string per caption: lower-cased tokens without punctuation, joined by single spaces.
    """
    return [_coco_line(toks) for toks in ptb_tokens(texts)]


def tokenize(text: str) -> str:
    """Tokenise one caption on its own (see :func:`tokenize_lines` for the exact batch behaviour)."""
    return tokenize_lines([text])[0]


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Drop-in for ``PTBTokenizer().tokenize`` taking plain strings: ``{id: [caption, ...]}``.

    Captions are scanned in the mapping's order, image after image, as pycocoevalcap writes them.
    """
    keys = [k for k, caps in captions.items() for _ in caps]
    flat = [c for caps in captions.values() for c in caps]
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, tokenize_lines(flat)):
        out[k].append(line)
    return out
