"""What may go into a mail header, and how we write it there.

A header value we write comes from a caller (a subject, an address) or from settings (the
sender). Before we write it, it is checked as given *and* as a mail reader would decode it
(RFC 2047 encoded words, repeatedly): a value whose decoded form holds CR, LF, NUL or another
control character is refused. CPython before 3.11.10 / 3.12.5 (CVE-2024-6923) decodes the
encoded words of a header while refolding it and writes the decoded line breaks raw, so
`=?utf-8?q?a=0D=0AReply-To:_x?=` became a header of its own; we never hand the email package
a caller's encoded word to refold: `fold_unstructured` encodes such a value whole.
"""

import re
from email import base64mime, policy
from email.errors import HeaderParseError
from email.header import decode_header

# C0 and C1 controls and DEL. Any of them in a header could start a new header line.
HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Anything a decoder could take for an encoded word (RFC 2047 section 2), charset and
# encoding unchecked and "?" allowed in the text, as `decode_header` allows it: a reader may
# be more lenient than the standard.
ENCODED_WORD = re.compile(r"=\?[^?]*\?[^?]*\?.*?\?=", re.DOTALL)
# The CVE-2024-6923 fix: from these versions on the email package quotes what it decodes.
FIXED_PYTHON = {(3, 11): (3, 11, 10), (3, 12): (3, 12, 5)}
# Decoding an encoded word can give another; a reader may decode that too.
_DECODE_ROUNDS = 4
# RFC 5322 section 2.1.1: lines of at most 78 characters before the CRLF.
MAX_LINE = 78
_MAX_WORD = 75


def _readings(value: str) -> set[str]:
    """`value` with its encoded words decoded once, as the email package's header parser
    (which `policy.default` uses) and as the older `decode_header` each read it."""
    readings = {str(policy.default.header_factory("Subject", value))}
    try:
        parts = decode_header(value)
    except HeaderParseError:
        return readings
    legacy = []
    for part, charset in parts:
        if isinstance(part, str):
            legacy.append(part)
            continue
        try:
            legacy.append(part.decode(charset or "ascii", "replace"))
        except LookupError:  # an unknown charset: its bytes as they are
            legacy.append(part.decode("latin-1"))
    readings.add("".join(legacy))
    return readings


def _unsafe(value: str) -> bool:
    # splitlines() also breaks on U+2028/U+2029, which the email package refuses.
    return bool(HEADER_UNSAFE.search(value)) or "".join(value.splitlines()) != value


def header_problem(value: str) -> str | None:
    """Why `value` cannot be written into a header, or None if it can."""
    if _unsafe(value):
        return "must not contain line breaks or other control characters"
    pending = {value}
    for _ in range(_DECODE_ROUNDS):
        encoded = {reading for reading in pending if ENCODED_WORD.search(reading)}
        if not encoded:
            return None
        decoded = set().union(*(_readings(reading) for reading in encoded)) - encoded
        if any(_unsafe(reading) for reading in decoded):
            return "must not contain encoded words (RFC 2047) that decode to control characters"
        pending = decoded
    return "must not nest encoded words (RFC 2047) this deep"


def fold_unstructured(name: str, value: str) -> str | None:
    """`value` as the body of an unstructured header (Subject), folded by us, when the
    email package must not see it: a value holding something a reader could take for an
    encoded word is encoded whole as UTF-8 base64 encoded words, so it reads back as it was
    given and nothing in it is decoded on the way. None: the email package may fold it.

    Every line stays within 78 characters, so the email package never refolds it (which
    would decode it); `email.header.Header` can overrun that with its Q words."""
    if "=?" not in value:
        return None
    words: list[str] = []
    room = MAX_LINE - len(name) - len(": ")
    chunk = b""
    for character in value:
        encoded = character.encode("utf-8")
        if len(chunk) + len(encoded) > _word_bytes(room):
            words.append(base64mime.header_encode(chunk, "utf-8"))
            chunk, room = b"", MAX_LINE - 1  # a continuation line starts with a space
        chunk += encoded
    words.append(base64mime.header_encode(chunk, "utf-8"))
    return "\r\n ".join(words)


def _word_bytes(room: int) -> int:
    """How many bytes one base64 word in UTF-8 holds in `room` characters (at most 75, RFC
    2047 section 2)."""
    encoded = min(room, _MAX_WORD) - len("=?utf-8?b??=")
    return encoded // 4 * 3
