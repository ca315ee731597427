"""Personal data in free text: find it, or replace it with a typed placeholder such as ``<EMAIL>``.

Each kind is a regular expression that proposes candidates and a check that confirms them, so
that numbers in ordinary text (GSM8K's ``<<16-3-4=9>>``, ``1,200,000``, dates, prices) are left
alone. What is detected:

- ``email``: ``local@domain.tld`` (ASCII; the top-level domain has two or more letters).
- ``phone``: international numbers written with ``+`` and a country code (8 to 15 digits, spaces,
  dots or dashes between groups, an optional ``(0)``), and North American numbers
  ``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``, ``555 123 4567``, ``1-800-555-0199``
  (written without parentheses, the area code must start with 2-9, as real ones do).
  National formats without ``+`` elsewhere (``020 7946 0958``) are not detected: without the
  country code they cannot be told from other digit groups.
- ``ip_address``: IPv4 with valid octets and IPv6 (full, ``::``-compressed, with an IPv4 tail),
  confirmed by :mod:`ipaddress`. ``::`` and ``::1`` alone are left (they name no host), as are
  colon-separated words without a digit (``dead::beef`` reads as code more often than as an address).
- ``credit_card``: 13 to 19 digits starting with 2-6 (the major networks), written together or in
  groups of 4-6 split by one kind of separator, confirmed by the Luhn checksum.
- ``iban``: upper-case country code, two check digits and the country's exact length (ISO 13616
  registry; unknown countries are not detected), together or in groups, confirmed by mod-97.
- ``national_id``: US social security numbers written ``123-45-6789`` (area 000, 666 and 900-999,
  group 00 and serial 0000 are never issued, so they are not detected) and UK national insurance
  numbers ``AB 12 34 56 C`` (prefix letters as HMRC allocates them; BG, GB, KN, NK, NT, TN, ZZ
  excluded). Nine digits without dashes are not detected: too many other numbers look the same.

Digits inside GSM8K-style calculator annotations (``<<...>>``) are never personal data.
"""

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

from tunelab.errors import TunelabError

PII_KINDS = ("email", "phone", "ip_address", "credit_card", "iban", "national_id")
PLACEHOLDERS = {kind: f"<{kind.upper()}>" for kind in PII_KINDS}

# Where two detectors claim overlapping text the longer match wins; on equal length, the kind
# with the stricter check (earlier here) wins.
_PRIORITY = {kind: rank for rank, kind in enumerate(("email", "iban", "credit_card", "national_id", "ip_address", "phone"))}


@dataclass(frozen=True)
class PiiMatch:
    kind: str  # one of PII_KINDS
    start: int
    end: int
    text: str


# Numbers glued to arithmetic, other digits or decimal points are parts of something else.
_BEFORE = r"(?<![\w.,+=*/<>$-])"
_AFTER = r"(?![\w=*/+<>-]|[.,]\d)"

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_PHONE_INTL = re.compile(_BEFORE + r"\+\d{1,3}(?:[ .-]?\(0\))?(?:[ .-]?\(?\d{1,4}\)?){2,6}" + _AFTER)
_PHONE_NANP = re.compile(
    _BEFORE + r"(?:1[ .-])?(?:\(\d{3}\) ?\d{3}[ .-]\d{4}|[2-9]\d{2}(?P<sep>[ .-])\d{3}(?P=sep)\d{4})" + _AFTER
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:])")
_CARD = re.compile(_BEFORE + r"[2-6]\d{3}(?:[ -]?\d){9,15}" + _AFTER)
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?= ?[A-Z0-9])")
_IBAN_BODY = re.compile(r"[A-Z0-9]+(?: [A-Z0-9]+)*")
_SSN = re.compile(_BEFORE + r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + _AFTER)
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")
# What the phone, card, national-id and IPv4 patterns all contain: six digits with at most two
# separators between neighbours (or a dotted quad).
_NUMBER_HINT = re.compile(r"\d(?:[ .()-]{0,2}\d){5}|\d\.\d{1,3}\.\d{1,3}\.\d")
_DIGIT = re.compile(r"\d")
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations

# ISO 13616 IBAN lengths by country (SWIFT IBAN registry).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def check_kinds(kinds) -> tuple[str, ...]:
    """The PII kinds to act on: all of them for None, else the named ones (a list, or one string
    with commas); an unknown name is an error that lists the known ones."""
    if kinds is None:
        return PII_KINDS
    if isinstance(kinds, str):
        kinds = [k for k in kinds.split(",") if k.strip()]
    kinds = tuple(k.strip() for k in kinds)
    unknown = [k for k in kinds if k not in PII_KINDS]
    if unknown:
        raise TunelabError(f"Unknown PII kind {', '.join(map(repr, unknown))}; choose among {', '.join(PII_KINDS)}.")
    return kinds


def find_pii(text: str, kinds=None) -> list[PiiMatch]:
    """The personal data in ``text``, in order, without overlaps; ``kinds`` limits which kinds are
    reported (all of ``PII_KINDS`` by default)."""
    wanted = check_kinds(kinds)
    return [m for m in _without_overlaps(_candidates(text)) if m.kind in wanted]


def _candidates(text: str) -> list[PiiMatch]:
    # Every detector runs even when some kinds are off, so that a card number is never reported
    # as a phone number just because cards were not asked for.
    found = _emails(text) if "@" in text else []
    if not _DIGIT.search(text):
        return found
    spans = [("iban", span) for span in _ibans(text)]
    if ":" in text:
        spans += [("ip_address", span) for span in _ipv6s(text)]
    # One cheap search spares most strings of ordinary text the four detectors below.
    if _NUMBER_HINT.search(text):
        for kind, detector in (("phone", _phones), ("ip_address", _ipv4s), ("credit_card", _cards), ("national_id", _national_ids)):
            spans += [(kind, span) for span in detector(text)]
    calculator = [m.span() for m in _CALCULATOR.finditer(text)] if spans else []
    return found + [PiiMatch(kind, s, e, text[s:e]) for kind, (s, e) in spans if not _inside(calculator, s, e)]


def redact(text: str, kinds=None) -> tuple[str, Counter]:
    """``text`` with each piece of personal data replaced by its placeholder (``<EMAIL>``,
    ``<PHONE>``, ...), and how many of each kind were replaced."""
    matches = find_pii(text, kinds)
    counts = Counter(m.kind for m in matches)
    for m in reversed(matches):
        text = text[: m.start] + PLACEHOLDERS[m.kind] + text[m.end :]
    return text, counts


def _without_overlaps(candidates: list[PiiMatch]) -> list[PiiMatch]:
    taken: list[PiiMatch] = []
    for m in sorted(candidates, key=lambda m: (m.start - m.end, _PRIORITY[m.kind], m.start)):
        if all(m.end <= t.start or m.start >= t.end for t in taken):
            taken.append(m)
    return sorted(taken, key=lambda m: m.start)


def _inside(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in spans)


def _emails(text: str) -> list[PiiMatch]:
    found = []
    for m in _EMAIL.finditer(text):
        top = m.group().rsplit(".", 1)[1]
        if len(top) >= 2 and top.isalpha():
            found.append(PiiMatch("email", m.start(), m.end(), m.group()))
    return found


def _phones(text: str) -> list[tuple[int, int]]:
    found = [m.span() for m in _PHONE_NANP.finditer(text)]
    for m in _PHONE_INTL.finditer(text):
        digits = sum(c.isdigit() for c in m.group().replace("(0)", ""))
        if 8 <= digits <= 15:
            found.append(m.span())
    return found


def _ipv4s(text: str) -> list[tuple[int, int]]:
    found = []
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        found.append(m.span())
    return found


def _ipv6s(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _IPV6.finditer(text) if _is_ipv6(m.group())]


def _is_ipv6(candidate: str) -> bool:
    groups = [g for g in candidate.split(":") if g]
    if len(groups) < 2 or not any(c.isdigit() for c in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _cards(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _CARD.finditer(text) if _card_layout(m.group()) and _luhn(re.sub(r"\D", "", m.group()))]


def _card_layout(candidate: str) -> bool:
    """Digits together, or in groups of 4-6 (the last group 1-6) with one kind of separator."""
    separators = set(re.sub(r"\d", "", candidate))
    if not separators:
        return True
    if len(separators) > 1:
        return False
    groups = candidate.split(separators.pop())
    return all(4 <= len(g) <= 6 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 6


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _ibans(text: str) -> list[tuple[int, int]]:
    # Only the start is matched, so that a failed candidate does not swallow an IBAN right after it.
    found = []
    for m in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(m.group()[:2])
        end = _end_after(text, m.start(), length) if length else None
        if end is None or (end < len(text) and text[end].isalnum()):
            continue
        piece = text[m.start() : end]
        if _IBAN_BODY.fullmatch(piece) and _iban_checksum(piece.replace(" ", "")):
            found.append((m.start(), end))
    return found


def _end_after(text: str, start: int, count: int) -> int | None:
    """The index just past the ``count``-th letter or digit from ``start`` (spaces skipped), or
    None where something else comes first."""
    seen = 0
    for index in range(start, len(text)):
        if text[index] != " " and not text[index].isalnum():
            return None
        if text[index].isalnum():
            seen += 1
            if seen == count:
                return index + 1
    return None


def _iban_checksum(iban: str) -> bool:
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _national_ids(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _SSN.finditer(text)] + [m.span() for m in _NINO.finditer(text)]
