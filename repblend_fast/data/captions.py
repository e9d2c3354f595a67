"""Caption cleaning for free-text metadata (Open Clip Art SVG titles and descriptions).

Metadata written by many authors carries markup, escaped entities, URLs, e-mail addresses,
licence and tool boilerplate, file-name-like titles (``"book_01"``) and placeholders
(``"Untitled"``, Perl's ``"HASH(0x85a0ae8)"``). :func:`clean_caption` removes all of these and
collapses whitespace; it returns ``""`` when nothing caption-like is left. :func:`clean_title`
additionally turns file-name-like titles into words, and :func:`sentence_like` says whether a
cleaned description reads as a sentence (three or more words, at most :data:`MAX_WORDS`).
"""

from __future__ import annotations

import html
import re

MAX_WORDS = 30  # a longer description keeps its first sentence, if that one is short enough

_TAG = re.compile(r"<[^>]*>")
# a URL with the words that point at it: "see http://...", "(from www.x.org)"
_URL = re.compile(
    r"(?:\b(?:see|visit|at|from|on|via)\s*:?\s+)?(?:https?://|ftp://|www\.)[^\s)\]]*", re.I
)
_EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
_PERL_REF = re.compile(r"\b(?:HASH|ARRAY|SCALAR|CODE)\(0x[0-9a-f]+\)", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A sentence (or line) mentioning any of these is licence / provenance / tool boilerplate.
_BOILERPLATE = re.compile(
    r"public\s*domain|creative\s*commons|\bcc[\s-]?by\b|\bcc0\b|licen[cs]|copyright|©|"
    r"\(c\)|all rights reserved|released under|\bgpl\b|open\s*clip\s*art|openclipart|"
    r"\binkscape\b|illustrator|\bsodipodi\b|converted from|created with|"
    r"made with|drawn with|\bclip\s*art\s+(?:collection|library)|\bcollection\b|\biconset\b|"
    r"\bpart of\b|\buploaded\b|\bsubmitted\b",
    re.I,
)
_PLACEHOLDERS = {
    "untitled",
    "untitled document",
    "new document",
    "new document 1",
    "drawing",
    "image",
    "picture",
    "clipart",
    "clip art",
    "title",
    "description",
    "none",
    "no title",
    "no description",
    "null",
    "test",
    "layer 1",
    "unsorted",
    "various",
    "various cliparts",
}
_TITLE_BYLINE = re.compile(r"^\s*clip\s*art\s+by\s+[^-–:]+[-–:]\s*", re.I)
_TRAILING_VERSION = re.compile(r"(?:[\s_\-#.]*(?:v|no\.?\s*)?\d+[a-z]?)+$", re.I)
_FILE_SEP = re.compile(r"[_+]+|(?<=\w)-(?=\w)(?=[^ ]*$)")
_EDGE_PUNCT = " \t-–—:;,/|*~_#"


def _unescape(text: str) -> str:
    # Some files escape twice ("B &amp;amp; W"): unescape until stable (at most three rounds).
    for _ in range(3):
        new = html.unescape(text)
        if new == text:
            break
        text = new
    return text


def _strip(text: str) -> str:
    text = " ".join(text.split())
    # brackets left empty or unclosed by a removed URL or address: "Flag ( )", "Flag (see"
    text = re.sub(r"\(\s*\)|\[\s*\]|\s*\([^)]*$", "", text)
    text = re.sub(r"\s+([.,!?;:)\]])", r"\1", text)  # "apple ." (a removed tag) -> "apple."
    text = re.sub(r"([(\[])\s+", r"\1", text)
    return " ".join(text.split()).strip(_EDGE_PUNCT)


def is_placeholder(text: str) -> bool:
    """True for empty, letter-poor or placeholder captions ("Untitled", "drawing", "x1")."""
    key = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return sum(ch.isalpha() for ch in text) < 3 or key in _PLACEHOLDERS


def clean_caption(text: str | None) -> str:
    """``text`` without markup, entities, URLs, e-mail addresses, Perl reference dumps and
    licence/tool boilerplate sentences, whitespace collapsed; ``""`` if nothing caption-like is
    left. Each line and sentence is judged on its own, so "A red apple. Public domain." keeps
    "A red apple."."""
    if not text:
        return ""
    text = _unescape(_TAG.sub(" ", _unescape(text)))
    text = _TAG.sub(" ", text)
    kept = []
    for line in text.splitlines():
        for sent in _SENTENCE_END.split(line):
            if _BOILERPLATE.search(sent):
                continue
            sent = _PERL_REF.sub(" ", _EMAIL.sub(" ", _URL.sub(" ", sent)))
            sent = _strip(sent)
            if sent and not is_placeholder(sent):
                kept.append(sent)
    out = _strip(" ".join(kept))
    return "" if is_placeholder(out) else out


def clean_title(text: str | None) -> str:
    """A title cleaned like :func:`clean_caption`, with a leading "Clipart by NAME - " byline
    dropped and a file-name-like title turned into words with its trailing version number
    removed (``"Clipart by Nicu Buculei - book_01"`` -> ``"book"``)."""
    if not text:
        return ""
    text = _TITLE_BYLINE.sub("", _unescape(text))
    if " " not in text.strip() or "_" in text:  # file-name-like: "arrow08_4", "tux_01"
        text = _FILE_SEP.sub(" ", text)
    text = _TRAILING_VERSION.sub("", text.strip())
    return clean_caption(text)


def sentence_like(text: str) -> str:
    """The sentence-like part of a cleaned description, or ``""``: the whole text when it has
    3 to :data:`MAX_WORDS` words, else its first sentence when that one does."""
    for cand in (text, _SENTENCE_END.split(text)[0] if text else ""):
        n = len(cand.split())
        if 3 <= n <= MAX_WORDS:
            return cand
    return ""
