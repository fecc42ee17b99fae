"""Who is not sent to, as plain rules; and the signed tokens that let a recipient or a
bounce say so. No session, no I/O.

- `folded`: the one form of an address that suppressions (and the recipient rate limits)
  are kept under: e-mail in lower case, without its `+tag`, its domain in IDNA ASCII.
- `blocking_scopes` and `blocking`: which suppressions stop a notification. Transactional
  mail obeys only scope "all" (hard bounces, complaints, blocks, manual ones) and its own
  template's "category:<key>"; marketing mail also "marketing".
- `Tokens`: the one-click unsubscribe token (address, channel, scope; signed with
  SECRET_KEY by itsdangerous, no expiry) and the VERP bounce address of a notification
  (`bounces+<id>-<mac>@BOUNCE_DOMAIN`).
- `with_unsubscribe`: a message with the visible unsubscribe link in both its parts.
"""

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

import idna
from itsdangerous import BadSignature, URLSafeSerializer

from config import Settings
from models import Category, Channel

ALL = "all"
MARKETING = "marketing"
CATEGORY = "category:"


def folded(channel: Channel | str, address: str) -> str:
    """The address as suppressions and recipient limits fold it: for e-mail, letter case,
    a `+tag` and the Unicode and ASCII forms of a domain are one (phone numbers and chat
    ids come normalised)."""
    if channel != Channel.EMAIL:
        return address
    local, _, domain = address.rpartition("@")
    local = local.lower().partition("+")[0]
    if domain.isascii():
        return f"{local}@{domain.lower()}"
    try:
        domain = idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        domain = domain.lower()
    return f"{local}@{domain}"


def unsubscribe_scope(category: Category, *, template_key: str | None, opts_in: bool) -> str | None:
    """The scope a notification's one-click link offers: "marketing" for marketing mail,
    "category:<key>" for a transactional template that opts in, else none (no link)."""
    if category == Category.MARKETING:
        return MARKETING
    if opts_in and template_key is not None:
        return CATEGORY + template_key
    return None


def blocking_scopes(category: Category | str, template_key: str | None) -> frozenset[str]:
    """The suppression scopes that stop a notification of `category` (and template)."""
    scopes = {ALL}
    if category == Category.MARKETING:
        scopes.add(MARKETING)
    if template_key is not None:
        scopes.add(CATEGORY + template_key)
    return frozenset(scopes)


def blocking(found: Iterable[tuple[str, str]], scopes: frozenset[str]) -> str | None:
    """Why the suppressions `found` for an address, as (scope, reason), stop a
    notification blocked by `scopes`; None if none does."""
    reasons = sorted(reason for scope, reason in found if scope in scopes)
    return f"suppressed: {reasons[0]}" if reasons else None


@dataclass(frozen=True)
class Unsubscribe:
    """What a one-click unsubscribe token names."""

    channel: Channel
    address: str
    scope: str


class Tokens:
    """Signs and reads unsubscribe tokens and VERP bounce addresses under one key."""

    def __init__(self, key: bytes, *, base_url: str, bounce_domain: str | None) -> None:
        self._serializer = URLSafeSerializer(key, salt="unsubscribe")
        # A label no text's HMAC (lifecycle.text_hmac) can be: texts hold no NUL.
        self._bounce_key = hmac.new(key, b"\x00bounce address", hashlib.sha256).digest()
        self.base_url = base_url.rstrip("/")
        self.bounce_domain = bounce_domain

    @classmethod
    def from_settings(cls, settings: Settings) -> "Tokens":
        """Under SECRET_KEY, for PUBLIC_BASE_URL and BOUNCE_DOMAIN."""
        return cls(
            settings.hmac_key(),
            base_url=settings.public_base_url,
            bounce_domain=settings.bounce_domain,
        )

    def unsubscribe_token(self, channel: Channel, address: str, scope: str) -> str:
        return self._serializer.dumps([str(channel), folded(channel, address), scope])

    def unsubscribe_url(self, channel: Channel, address: str, scope: str) -> str:
        return f"{self.base_url}/unsubscribe/{self.unsubscribe_token(channel, address, scope)}"

    def read_unsubscribe(self, token: str) -> Unsubscribe | None:
        """What `token` names, or None if it is not one of ours."""
        try:
            channel, address, scope = self._serializer.loads(token)
            return Unsubscribe(Channel(channel), str(address), str(scope))
        except (BadSignature, ValueError, TypeError):
            return None

    def bounce_address(self, notification_id: int) -> str | None:
        """The envelope sender that brings the notification's bounces back to us (lower
        case and digits only: some MTAs fold the local part's case)."""
        if self.bounce_domain is None:
            return None
        return f"bounces+{notification_id}-{self._mac(notification_id)}@{self.bounce_domain}"

    def read_bounce(self, address: str) -> int | None:
        """The notification a VERP bounce address names, or None if it is not ours."""
        local = address.rpartition("@")[0].lower()
        tag = local.partition("+")[2]
        number, _, mac = tag.partition("-")
        if not (number.isascii() and number.isdigit()) or len(number) > 18:
            return None
        notification_id = int(number)
        expected = self._mac(notification_id).encode("ascii")
        return notification_id if hmac.compare_digest(mac.encode(), expected) else None

    def _mac(self, notification_id: int) -> str:
        digest = hmac.new(self._bounce_key, str(notification_id).encode(), hashlib.sha256)
        return digest.hexdigest()[:16]


# The visible link's words, by locale.
_LINK_TEXT = {"ru": "Отписаться от этих писем", "en": "Unsubscribe from these emails"}


def link_text(locale: str | None) -> str:
    return _LINK_TEXT.get((locale or "ru")[:2], _LINK_TEXT["ru"])


@dataclass(frozen=True)
class Decorated:
    """A text and HTML body with the unsubscribe link shown in each."""

    text: str
    html: str | None


def with_unsubscribe(text: str, html: str | None, url: str, locale: str | None) -> Decorated:
    """`text` and `html` with a visible unsubscribe link at their end (in the HTML, before
    `</body>` when there is one)."""
    words = link_text(locale)
    text = f"{text.rstrip()}\n\n--\n{words}: {url}\n"
    if html is not None:
        link = f'<p style="font-size:12px;color:#666"><a href="{escape(url)}">{words}</a></p>'
        at = html.lower().rfind("</body>")
        html = html[:at] + link + html[at:] if at >= 0 else html + link
    return Decorated(text, html)


Found = Mapping[tuple[str, str], Sequence[tuple[str, str]]]


def stopped(
    found: Found, channel: Channel | str, address: str, scopes: frozenset[str]
) -> str | None:
    """Why the suppressions `found` (by channel and folded address, as
    `crud.suppressions_for` gives them) stop `address` on `channel`; None if they do not."""
    return blocking(found.get((str(channel), folded(channel, address)), ()), scopes)


def suppressed_steps(
    route: Sequence[tuple[Channel, str]], found: Found, scopes: frozenset[str]
) -> dict[Channel, str]:
    """Each channel of `route` whose address a suppression of `found` stops, with why."""
    reasons = {channel: stopped(found, channel, address, scopes) for channel, address in route}
    return {channel: reason for channel, reason in reasons.items() if reason is not None}
