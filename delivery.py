"""The one owner of a notification's lifecycle: routes, the worker and (later) the
console call it, and nothing else calls a channel.

- `submit` (and `submit_bulk`): route a request's message (`lifecycle.plan_route`, for
  every endpoint), check its schedule and the recipient's hourly limit, claim its
  Idempotency-Key or replay the first answer, store it, and send it now in the request
  (under SYNC_SEND_LIMIT) or leave it to the queue.
- `attempt`: one try on the notification's current channel and the transition it makes
  (`lifecycle.next_state`), the same function for a synchronous send and for a worker.
- `deliver`: a synchronous send, with the quick retries (`retries.quick_retries`), going
  on at once to the next channel past a refusal.
- `settle`: store a worker batch's transitions in one statement.
- `cancel` and `resend`, for operators.
Every outcome, cancel and resend stored is announced to `hooks` (webhooks, metrics and
suppression will attach there), those stored late after an outage included; a worker's
claims and releases of its lease, and the withdrawal of what a request answered 503 may
have stored, are not (no message was sent or settled).

An attempt's outcome is stored with the state it leaves the notification in, in one
commit, and only while the sender still holds the notification's lease; what the
database could not take is kept (`recorder.Unrecorded`) and stored when it is back.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from http import HTTPStatus

from pydantic import BaseModel
from sqlalchemy.orm import Session
from tenacity import Retrying

import crud
import idempotency
import ratelimits
import recorder
import suppression
from attachments import Attachments, described
from channels.base import (
    DeliveryError,
    File,
    Message,
    PermanentDeliveryError,
    Receipt,
    Sender,
    TransientDeliveryError,
)
from config import Settings
from db import DATABASE_UNAVAILABLE
from idempotency import IdempotencyClaim, IdempotencyKeyUsed
from lifecycle import (
    TELEGRAM_MAX_TEXT,
    Attempt,
    Draft,
    EverySuppressed,
    Policy,
    Refused,
    Transition,
    cancelled,
    carries_files,
    erased,
    holding_on,
    message_for,
    next_state,
    plan_route,
    recorded_only,
    resent,
)
from mailer import new_message_id, new_message_ids
from models import (
    ApiKey,
    Batch,
    Category,
    Channel,
    Notification,
    NotificationStatus,
    Recipient,
    SuppressionReason,
    Template,
    TemplateVersion,
    utcnow,
)
from ratelimits import RateLimiter
from recorder import Unrecorded
from retries import queue_backoff, quick_retries
from schemas import (
    BulkEmailCreate,
    EmailNotificationCreate,
    MessageContent,
    NotificationCreate,
    RejectedRecipient,
    SmsNotificationCreate,
    TelegramNotificationCreate,
    printable,
)
from suppression import Tokens
from templating import Renderer, TemplateError, Variable, pick_locale

logger = logging.getLogger(__name__)

Hook = Callable[[Sequence[Transition]], None]


class OutcomeNotRecorded(Exception):
    """The provider answered but the database did not take the outcome; it is kept in
    `Unrecorded` and stored when the database is back."""

    def __init__(self, transition: Transition) -> None:
        super().__init__(f"notification {transition.notification_id}: outcome not recorded yet")
        self.transition = transition


class LeaseLost(Exception):
    """Another sender took the notification over; what happens next is theirs."""


class Conflict(Exception):
    """The notification is not in a state the operation applies to (a 409)."""


@dataclass(frozen=True)
class Sending:
    """Who sends, and how they asked: what every send endpoint is given. Its session is the
    request's: the endpoint closes it, in its own thread, by `with` (a generator dependency
    per request cost more than the rest of the dependencies together)."""

    caller: ApiKey
    session: Session
    limiter: RateLimiter
    prefer_async: bool = False
    idempotency_key: str | None = None
    # The request's count against its key, when the key check left it to the send.
    key_count: ratelimits.KeyCount | None = None

    def __enter__(self) -> "Sending":
        return self

    def __exit__(self, *_: object) -> None:
        # Closing rolls back what is open: on a connection the database dropped that may
        # fail, and must not replace the request's own answer (its 503, say).
        try:
            self.session.close()
        except DATABASE_UNAVAILABLE as exc:
            logger.warning("closing a database session failed: %s", exc)


@dataclass(frozen=True)
class Submitted:
    """A request's notification, and how to answer it."""

    notification: Notification
    status_code: int
    replayed: bool = False
    # Queued because the caller preferred it (RFC 7240 Preference-Applied).
    preference_applied: bool = False


@dataclass(frozen=True)
class BatchSubmitted:
    """A bulk request's batch, the items refused, those suppressed, and whether it was
    replayed."""

    batch: Batch
    rejected: list[RejectedRecipient]
    replayed: bool = False
    suppressed: list[RejectedRecipient] = field(default_factory=list)


@dataclass(frozen=True)
class Chosen:
    """The template version a request sends by, read once per request."""

    template: Template
    version: TemplateVersion
    variables: Sequence[Variable]


@dataclass(frozen=True)
class Target:
    """Where a message goes: its order of channels with the recipient's address on
    each; `requested` if the order is the caller's own."""

    order: Sequence[Channel]
    addresses: Mapping[Channel, str | None]
    requested: bool = True
    recipient: Recipient | None = None
    subject: str | None = None
    parse_mode: str | None = None


def outcome_status(notification: Notification, *, sent: int = HTTPStatus.CREATED) -> int:
    """`sent` if sent; 502 failed; 202 left to the background retries (queued, taken over)."""
    if notification.status == NotificationStatus.SENT:
        return sent
    if notification.status == NotificationStatus.FAILED:
        return HTTPStatus.BAD_GATEWAY
    return HTTPStatus.ACCEPTED


def _email_parts(draft: Draft) -> list[str]:
    """The subject and bodies a draft's e-mail would carry."""
    email = (draft.content or {}).get(str(Channel.EMAIL))
    parts = [draft.subject, draft.text] if email is None else [*email.values()]
    return [part for part in parts if part]


class SyncSlot:
    """One of SYNC_SEND_LIMIT synchronous sends at once, if one is free: slow providers
    must not take every request thread (past the limit, the queue sends)."""

    def __init__(self, slots: threading.BoundedSemaphore, wanted: bool) -> None:
        self._slots = slots
        self.held = wanted and slots.acquire(blocking=False)

    def release(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()

    def __enter__(self) -> "SyncSlot":
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Deliverer:
    """Submits, sends and settles notifications; see the module docstring.

    Each channel has a list of senders (providers), tried in order while one fails
    transiently; today each channel has one.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        channels: Mapping[Channel, Sender | Sequence[Sender]],
        retrying: Retrying | None = None,
        backoff: Callable[[int], float] | None = None,
        now: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        renderer: Renderer | None = None,
    ) -> None:
        self.settings = settings
        # Templates are rendered here, once, when a notification is accepted.
        self.renderer = renderer or Renderer(brand=settings.brand())
        self.attachments = Attachments(settings, now=now)
        self.channels: dict[Channel, list[Sender]] = {
            channel: list(senders) if isinstance(senders, Sequence) else [senders]
            for channel, senders in channels.items()
        }
        self.retrying = retrying or quick_retries(settings)
        self.sender = settings.email_from
        # How long a synchronous send may take before a worker may take it over.
        self.lease = timedelta(seconds=settings.worker_lease)
        # The HMAC key of erased sensitive texts and sensitive idempotency fingerprints.
        self.key = settings.hmac_key()
        self.policy = Policy(
            max_attempts=settings.queue_max_attempts,
            fallback_after=settings.fallback_after_attempts or settings.queue_max_attempts,
            backoff=backoff or queue_backoff(settings),
            key=self.key,
        )
        # The clock: what time it is, and how a repeat waits for its first request.
        self.now = now
        self.sleep = sleep
        self.sync_sends = threading.BoundedSemaphore(settings.sync_send_limit)
        self.unrecorded = Unrecorded()
        self.hooks: list[Hook] = []
        # Unsubscribe links and VERP bounce addresses, signed under SECRET_KEY.
        self.tokens = Tokens.from_settings(settings)

    @property
    def pool_size(self) -> int:
        """Messages sent at once by a worker: the largest channel's connection pool."""
        sizes = [sender.pool_size for senders in self.channels.values() for sender in senders]
        return max(sizes, default=1)

    # Submitting

    def submit_email(self, ctx: Sending, data: EmailNotificationCreate) -> Submitted:
        """`POST /notify/email`."""
        target = Target([Channel.EMAIL], {Channel.EMAIL: data.email}, subject=data.subject)
        return self.submit(ctx, data, target, endpoint="/notify/email")

    def submit_sms(self, ctx: Sending, data: SmsNotificationCreate) -> Submitted:
        """`POST /notify/sms`."""
        target = Target([Channel.SMS], {Channel.SMS: data.phone})
        return self.submit(ctx, data, target, endpoint="/notify/sms")

    def submit_telegram(self, ctx: Sending, data: TelegramNotificationCreate) -> Submitted:
        """`POST /notify/telegram`."""
        target = Target(
            [Channel.TELEGRAM], {Channel.TELEGRAM: data.chat_id}, parse_mode=data.parse_mode
        )
        return self.submit(ctx, data, target, endpoint="/notify/telegram")

    def submit_routed(self, ctx: Sending, data: NotificationCreate) -> Submitted:
        """`POST /notify`: the order is the request's `channels`, else the stored
        recipient's own, else CHANNEL_ORDER."""
        contacts = data.recipient
        recipient = None
        if contacts.external_id is not None:
            recipient = crud.get_recipient(session=ctx.session, external_id=contacts.external_id)
            if recipient is None:
                raise Refused("no recipient with this external_id", field="recipient.external_id")
        addresses = {
            channel: recipient.address(channel) if recipient else contacts.address(channel)
            for channel in Channel
        }
        own_order = recipient.channels if recipient is not None else None
        target = Target(
            data.channels or [Channel(c) for c in own_order or self.settings.channel_order],
            addresses,
            requested=data.channels is not None,
            recipient=recipient,
            subject=data.subject,
            parse_mode=data.parse_mode,
        )
        return self.submit(ctx, data, target, endpoint="/notify")

    def choose_template(self, session: Session, data: MessageContent) -> Chosen | None:
        """The template version `data` sends by (its `version`, else the active one), or
        None when it has a text of its own; `Refused` if there is no such version."""
        if data.template is None:
            return None
        found = crud.resolve_template(session=session, key=data.template, number=data.version)
        if found is None:
            what = "template" if data.version is None else f"version {data.version} of the template"
            raise Refused(f"no {what} {data.template!r} to send", field="template")
        template, version = found
        variables = [Variable(**spec) for spec in version.variables]
        return Chosen(template, version, variables)

    def render(
        self,
        chosen: Chosen,
        target: Target,
        data: MessageContent,
        values: Mapping[str, object] | None = None,
    ) -> tuple[str, dict[Channel, tuple[str | None, str]], dict[str, dict[str, str]]]:
        """`chosen` rendered for the channels of `target.order` with `values` (default:
        `data.data`): its locale, each channel's (subject, text), and what to store."""
        recipient = target.recipient
        version = chosen.version
        locale = pick_locale(
            version.content,
            data.locale,
            recipient.locale if recipient is not None else None,
            chosen.template.default_locale,
        )
        if locale is None or (data.locale and not data.locale.lower().startswith(locale)):
            raise Refused(
                f"version {version.number} of {chosen.template.key!r} has no locale "
                f"{data.locale or 'ru'}",
                field="locale",
            )
        try:
            rendered = self.renderer.render(
                version.content,
                chosen.variables,
                (data.data or {}) if values is None else values,
                locale=locale,
                channels=target.order,
                telegram_html=version.telegram_parse_mode == "HTML",
            )
        except TemplateError as exc:
            raise Refused(str(exc), field=exc.field) from None
        parts = {channel: (r.subject, r.text) for channel, r in rendered.items()}
        stored = {str(channel): r.stored() for channel, r in rendered.items()}
        return locale, parts, stored

    def draft(
        self,
        target: Target,
        data: MessageContent,
        chosen: Chosen | None = None,
        values: Mapping[str, object] | None = None,
        *,
        found: suppression.Found,
    ) -> Draft:
        """The notification to store for `data` (its text, or `chosen` rendered with
        `values`) on the channels of `target` that can reach the recipient and whose
        address is not suppressed (`found`: `crud.suppressions_for` of its addresses);
        `lifecycle.Unroutable` if none can; a `suppressed` draft if only suppressions
        stop it."""
        recipient = target.recipient
        rendered: dict[Channel, tuple[str | None, str]] | None = None
        template: dict[str, object] = {}
        text, subject = data.text or "", target.subject
        # A marketing template stays marketing: a caller cannot take its unsubscribe away.
        category = data.category or Category.TRANSACTIONAL
        if chosen is not None and (
            data.category is None or chosen.template.category == "marketing"
        ):
            category = chosen.template.category
        template_key = chosen.template.key if chosen is not None else None
        blocked = suppression.suppressed_steps(
            [(c, a) for c, a in target.addresses.items() if a is not None and c in target.order],
            found,
            suppression.blocking_scopes(category, template_key),
        )
        if chosen is not None:
            locale, rendered, stored = self.render(chosen, target, data, values)
        suppressed: str | None = None
        try:
            route, skipped = plan_route(
                order=target.order,
                addresses=target.addresses,
                configured=self.channels.keys(),
                suppressed=blocked,
                subject=target.subject,
                text=text,
                requested=target.requested,
                rendered=rendered,
            )
        except EverySuppressed as every:
            route, skipped, suppressed = [every.step], every.skipped, every.reason
        sensitive = data.sensitive or (chosen is not None and chosen.template.sensitive)
        if chosen is not None:
            assert rendered is not None
            subject, text = rendered[route[0][0]]
            if sensitive:
                # A rendered subject may hold the code: it lives in `content` alone, which
                # is erased once the notification is settled.
                subject = None
            template = {
                "template_key": chosen.template.key,
                "template_version": chosen.version.number,
                "locale": locale,
                "content": {str(c): stored[str(c)] for c, _ in route},
            }
        return Draft(
            route=route,
            skipped=skipped,
            text=text,
            subject=subject,
            sensitive=sensitive,
            send_at=data.send_at,
            parse_mode=target.parse_mode,
            recipient_id=recipient.id if recipient is not None else None,
            category=category,
            unsubscribe=suppression.unsubscribe_scope(
                category,
                template_key=template_key,
                opts_in=chosen is not None and chosen.template.unsubscribe,
            ),
            suppressed=suppressed,
            **template,  # type: ignore[arg-type]
        )

    def found(self, session: Session, targets: Sequence[Target]) -> suppression.Found:
        """The suppressions of every address of `targets` on their channels (one query)."""
        return crud.suppressions_for(
            session=session,
            pairs=[
                (channel, address)
                for target in targets
                for channel, address in target.addresses.items()
                if address is not None and channel in target.order
            ],
            now=self.now,
        )

    def attach(
        self, session: Session, data: MessageContent, content: Draft, drafts: Sequence[Draft]
    ) -> Draft:
        """`content` with the attachments `data` names (inline ones stored now), for the
        `drafts` it is sent as (none: `content` itself, by e-mail). `Refused` when no
        draft has e-mail on its route or the message is sensitive (attachments are not
        erased); `AttachmentRefused` when an attachment is missing, of a type not allowed,
        or the largest e-mail would weigh too much."""
        assert data.attachments
        if content.sensitive:
            raise Refused("a sensitive notification carries no attachments", field="attachments")
        emails = [d for d in drafts or [content] if not d.route or Channel.EMAIL in dict(d.route)]
        if not emails:
            raise Refused(
                "attachments go by e-mail only, and no channel of the route is e-mail",
                field="attachments",
            )
        # The largest e-mail decides (a bulk by template renders one for each recipient).
        largest = max((_email_parts(d) for d in emails), key=lambda parts: sum(map(len, parts)))
        resolved = self.attachments.resolve(session=session, items=data.attachments, parts=largest)
        return replace(content, attachments=[described(a) for a in resolved])

    def submit(
        self, ctx: Sending, data: MessageContent, target: Target, *, endpoint: str
    ) -> Submitted:
        """Store the message and send it now on its first channel (201/502), or queue it
        (202) when asked to, when `send_at` is set, or past SYNC_SEND_LIMIT sends in
        progress. A repeat of an Idempotency-Key answers what its first request did."""
        chosen = self.choose_template(ctx.session, data)
        draft = self.draft(target, data, chosen, found=self.found(ctx.session, [target]))
        self.check_send_at(draft.send_at)
        if data.attachments:
            draft = self.attach(ctx.session, data, draft, [draft])
        # The key's fingerprint is the request's alone, not what the suppressions say now.
        asked = draft.send_at is not None or ctx.prefer_async
        claim = self._claim(ctx, endpoint, data, queued=asked)
        # Suppressed on every channel: stored final, answered as accepted, nothing sent.
        queued = asked or draft.suppressed is not None
        session = ctx.session
        with SyncSlot(self.sync_sends, not queued) as slot:
            try:
                # A repeat is answered before the rate limits are counted: it sends nothing.
                idempotency.raise_if_key_used(session=session, claim=claim, now=self.now)
                self._count_recipient(ctx, *draft.route[0])
                notification = self.create(
                    session=session, draft=draft, queued=not slot.held, idempotency=claim
                )
            except IdempotencyKeyUsed as used:
                # A repeat sends nothing: its wait for the first request holds no slot.
                slot.release()
                return self._replay(ctx, session, claim, used)
            if not slot.held:
                return Submitted(
                    notification,
                    HTTPStatus.ACCEPTED,
                    preference_applied=ctx.prefer_async and draft.suppressed is None,
                )
            self.deliver(session=session, notification=notification)
        status_code = outcome_status(notification)
        if claim is not None:
            idempotency.finish_key(session=session, claim=claim, status_code=status_code)
        return Submitted(notification, status_code)

    def submit_bulk(self, ctx: Sending, data: BulkEmailCreate) -> BatchSubmitted:
        """Queue one message to each item as a batch: an e-mail to each of `emails`, or to
        each stored recipient of `recipients` on its channel order. Invalid, unknown or
        unreachable items are listed, not fatal; none valid is a 422."""
        self.check_send_at(data.send_at)
        session = ctx.session
        for channel in data.channels or ():
            if channel not in self.channels:
                raise Refused(f"the {channel} channel is not configured")
        telegram = Channel.TELEGRAM in (data.channels or ())
        if telegram and data.text is not None and len(data.text) > TELEGRAM_MAX_TEXT:
            raise Refused(f"Telegram takes at most {TELEGRAM_MAX_TEXT} characters", field="text")
        chosen = self.choose_template(session, data)
        drafts: dict[int, Draft] = {}
        if data.emails is not None and chosen is None:
            items, refused = self._email_items(data)
            suppressed = self._suppressed_items(session, data, items)
        else:
            if data.emails is not None:
                assert chosen is not None
                drafts, refused = self._email_drafts(session, data, chosen)
            else:
                drafts, refused = self._recipient_drafts(session, data, chosen)
            suppressed = [
                self._item(data, i, draft.suppressed)
                for i, draft in drafts.items()
                if draft.suppressed is not None
            ]
            drafts = {i: d for i, d in drafts.items() if d.suppressed is None}
            items = {i: draft.route[0] for i, draft in drafts.items()}
        if not items and not suppressed:
            raise NoValidRecipient(refused)
        claim = self._claim(ctx, "/notify/bulk", data)
        try:
            idempotency.raise_if_key_used(session=session, claim=claim, now=self.now)
            sendable, limited = self._within_recipient_limits(ctx, data, items)
            category = data.category or Category.TRANSACTIONAL
            content = Draft(
                route=(),
                text=data.text or "",
                subject=data.subject,
                sensitive=data.sensitive or (chosen is not None and chosen.template.sensitive),
                send_at=data.send_at,
                category=category,
                unsubscribe=suppression.unsubscribe_scope(
                    category, template_key=None, opts_in=False
                ),
            )
            if data.attachments:
                shown = [drafts[i] for i in sendable] if drafts else []
                content = self.attach(session, data, content, shown)
                drafts = {i: replace(d, attachments=content.attachments) for i, d in drafts.items()}
            batch = self.create_batch(
                session=session,
                content=content,
                requested=data.requested,
                emails=[items[i][1] for i in sendable] if not drafts else (),
                drafts=[drafts[i] for i in sendable] if drafts else (),
                idempotency=claim,
            )
        except IdempotencyKeyUsed as used:
            assert claim is not None
            self._count_key(ctx)
            record = self._first_answer(session, claim, used)
            assert record.batch_id is not None
            found = crud.get_batch(session=session, batch_id=record.batch_id)
            assert found is not None  # the key goes when its batch goes
            # The rate limits a replay met the first time are not known any more.
            return BatchSubmitted(
                found, refused, replayed=True, suppressed=sorted(suppressed, key=lambda r: r.index)
            )
        rejected = sorted([*refused, *limited], key=lambda r: r.index)
        return BatchSubmitted(batch, rejected, suppressed=sorted(suppressed, key=lambda r: r.index))

    def _suppressed_items(
        self, session: Session, data: BulkEmailCreate, items: dict[int, tuple[Channel, str]]
    ) -> list[RejectedRecipient]:
        """Take out of `items` (a plain bulk's e-mail addresses) those suppressed for
        its category; listed as items not sent, with why."""
        found = crud.suppressions_for(session=session, pairs=items.values(), now=self.now)
        if not found:
            return []
        scopes = suppression.blocking_scopes(data.category or Category.TRANSACTIONAL, None)
        listed = []
        for index, (channel, address) in list(items.items()):
            reason = suppression.stopped(found, channel, address, scopes)
            if reason is not None:
                del items[index]
                listed.append(self._item(data, index, reason))
        return listed

    @staticmethod
    def _item(data: BulkEmailCreate, index: int, error: str) -> RejectedRecipient:
        """A bulk request's item as a response lists it."""
        external_ids = data.external_ids() if data.recipients is not None else None
        return RejectedRecipient(
            index=index,
            email=data.email_item(index),
            external_id=external_ids[index] if external_ids is not None else None,
            error=error,
        )

    def _email_items(
        self, data: BulkEmailCreate
    ) -> tuple[dict[int, tuple[Channel, str]], list[RejectedRecipient]]:
        """The route's one step for each valid address of `data.emails` (by item index),
        and the items refused. No draft each: the batch's rows share all but the address."""
        # Checked here, in a worker thread, rather than while the event loop parses the body.
        emails, rejected = data.valid_emails()
        items: dict[int, tuple[Channel, str]] = {}
        configured = self.channels.keys()
        for address, index in emails.items():
            try:
                [step], _ = plan_route(
                    order=[Channel.EMAIL],
                    addresses={Channel.EMAIL: address},
                    configured=configured,
                    subject=data.subject,
                    text=data.text or "",
                )
            except Refused as exc:
                rejected.append(RejectedRecipient(index=index, email=address, error=str(exc)))
                continue
            items[index] = step
        return items, rejected

    def _email_drafts(
        self, session: Session, data: BulkEmailCreate, chosen: Chosen
    ) -> tuple[dict[int, Draft], list[RejectedRecipient]]:
        """A draft for each valid address of `data.emails` (by item index), the template
        rendered with the item's data, and the items refused."""
        emails, rejected = data.valid_emails()
        drafts: dict[int, Draft] = {}
        targets = {
            index: Target([Channel.EMAIL], {Channel.EMAIL: address})
            for address, index in emails.items()
        }
        found = self.found(session, list(targets.values()))
        for address, index in emails.items():
            try:
                drafts[index] = self.draft(
                    targets[index], data, chosen, data.item_data(index), found=found
                )
            except Refused as exc:
                error = printable(f"{exc.field}: {exc}")
                rejected.append(RejectedRecipient(index=index, email=address, error=error))
        return drafts, rejected

    def _recipient_drafts(
        self, session: Session, data: BulkEmailCreate, chosen: Chosen | None = None
    ) -> tuple[dict[int, Draft], list[RejectedRecipient]]:
        """A draft for each stored recipient of `data.recipients` (by item index), and the
        items refused: unknown, repeated, or no channel of the order reaches them."""
        external_ids = data.external_ids()
        found = crud.get_recipients(session=session, external_ids=list(set(external_ids)))
        order = data.channels or list(Channel)
        suppressions = self.found(
            session,
            [Target(order, {c: r.address(c) for c in Channel}) for r in found.values()],
        )
        drafts: dict[int, Draft] = {}
        rejected: list[RejectedRecipient] = []
        seen: dict[str, int] = {}
        for index, external_id in enumerate(external_ids):
            recipient = found.get(external_id)
            if external_id in seen:
                error = f"duplicate of item {seen[external_id]}"
            elif recipient is None:
                error = "no recipient with this external_id"
            else:
                seen[external_id] = index
                order = data.channels or [
                    Channel(c) for c in recipient.channels or self.settings.channel_order
                ]
                target = Target(
                    order,
                    {c: recipient.address(c) for c in Channel},
                    requested=data.channels is not None,
                    recipient=recipient,
                    subject=data.subject,
                )
                values = data.item_data(index) if chosen is not None else None
                try:
                    drafts[index] = self.draft(target, data, chosen, values, found=suppressions)
                    continue
                except Refused as exc:
                    error = printable(str(exc) if chosen is None else f"{exc.field}: {exc}")
            rejected.append(
                RejectedRecipient(index=index, external_id=printable(external_id), error=error)
            )
        return drafts, rejected

    def _within_recipient_limits(
        self, ctx: Sending, data: BulkEmailCreate, items: Mapping[int, tuple[Channel, str]]
    ) -> tuple[list[int], list[RejectedRecipient]]:
        """The items (indices) whose first address is still under its hourly limit, and
        the others as rejected items."""
        allowed: list[int] = []
        limited: list[RejectedRecipient] = []
        external_ids = data.external_ids() if data.recipients is not None else None
        for channel in Channel:
            on_channel = [(i, address) for i, (c, address) in items.items() if c == channel]
            if not on_channel:
                continue
            # Two stored recipients may share an address: each message counts.
            granted, _, _ = ratelimits.take_recipients(
                limiter=ctx.limiter,
                settings=self.settings,
                caller=ctx.caller,
                recipients=[address for _, address in on_channel],
                channel=channel,
                key=ctx.key_count,
            )
            for (i, _), ok in zip(on_channel, granted, strict=True):
                if ok:
                    allowed.append(i)
                    continue
                limited.append(
                    RejectedRecipient(
                        index=i,
                        email=data.email_item(i),
                        external_id=external_ids[i] if external_ids is not None else None,
                        error=ratelimits.RECIPIENT_LIMITED,
                    )
                )
        return sorted(allowed), limited

    def check_send_at(self, send_at: datetime | None) -> None:
        """`Refused` unless `send_at` is within SEND_AT_HORIZON of now (either way)."""
        horizon = timedelta(seconds=self.settings.send_at_horizon)
        if send_at is None or abs(send_at - self.now()) <= horizon:
            return
        raise Refused(f"must be within {horizon.days} days of now", field="send_at")

    def _claim(
        self, ctx: Sending, endpoint: str, body: BaseModel, *, queued: bool | None = None
    ) -> IdempotencyClaim | None:
        extra = {} if queued is None else {"queued": queued}
        return idempotency.claim_for(
            ctx.idempotency_key,
            scope=f"key:{ctx.caller.id}",
            endpoint=endpoint,
            body=body,
            ttl=self.settings.idempotency_key_ttl,
            secret=self.key,
            **extra,
        )

    def _count_recipient(self, ctx: Sending, channel: Channel, address: str) -> None:
        """Count the message against its address's hourly limit, and the request against
        its key's if that is left to it (one round trip); a 429 past either."""
        [allowed], limit, retry_after = ratelimits.take_recipients(
            limiter=ctx.limiter,
            settings=self.settings,
            caller=ctx.caller,
            recipients=[address],
            channel=channel,
            key=ctx.key_count,
        )
        if not allowed:
            raise ratelimits.TooMany(
                f"more than {limit} messages per hour to this address", retry_after
            )

    def _count_key(self, ctx: Sending) -> None:
        """Count a repeated request against its key (it counts no recipient)."""
        ratelimits.take_recipients(
            limiter=ctx.limiter,
            settings=self.settings,
            caller=ctx.caller,
            recipients=[],
            key=ctx.key_count,
        )

    def _first_answer(
        self, session: Session, claim: IdempotencyClaim, used: IdempotencyKeyUsed
    ) -> "idempotency.IdempotencyKey":
        return idempotency.first_outcome(
            session=session,
            claim=claim,
            record=used.record,
            wait=self.settings.idempotency_wait,
            lease=self.lease,
            now=self.now,
            sleep=self.sleep,
        )

    def _replay(
        self,
        ctx: Sending,
        session: Session,
        claim: IdempotencyClaim | None,
        used: IdempotencyKeyUsed,
    ) -> Submitted:
        """What a repeated request answers: its first request's notification and status."""
        assert claim is not None
        self._count_key(ctx)
        record = self._first_answer(session, claim, used)
        # The key's fingerprint names this endpoint, so it points at a notification.
        assert record.notification_id is not None
        replay = crud.get_notification(session=session, notification_id=record.notification_id)
        if replay is None:  # deleted between the key's read and this one
            raise Conflict("the first request's notification no longer exists")
        return Submitted(replay, record.status_code or outcome_status(replay), replayed=True)

    def create(
        self,
        *,
        session: Session,
        draft: Draft,
        queued: bool = False,
        idempotency: IdempotencyClaim | None = None,
    ) -> Notification:
        """Store a new notification: to send now, or queued for a worker."""
        by_email = any(channel == Channel.EMAIL for channel, _ in draft.route)
        settled = draft.suppressed is not None and draft.sensitive
        with self._withdrawn_if_unconfirmed(draft):
            return crud.create_notification(
                session=session,
                draft=draft,
                message_id=new_message_id(self.sender) if by_email else None,
                queued=queued,
                lease=self.lease,
                idempotency=idempotency,
                now=self.now,
                erase=erased(draft.text, self.key) if settled else None,
            )

    def create_batch(
        self,
        *,
        session: Session,
        content: Draft,
        requested: int,
        emails: Sequence[str] = (),
        drafts: Sequence[Draft] = (),
        idempotency: IdempotencyClaim | None = None,
    ) -> Batch:
        """Queue one e-mail to each of `emails`, or one notification per draft, as a batch."""
        with self._withdrawn_if_unconfirmed(content):
            return crud.create_batch(
                session=session,
                content=content,
                requested=requested,
                emails=emails,
                drafts=drafts,
                message_ids=new_message_ids(self.sender, len(emails) + len(drafts)),
                idempotency=idempotency,
                now=self.now,
            )

    @contextmanager
    def _withdrawn_if_unconfirmed(self, content: Draft) -> Iterator[None]:
        """The request is answered 503 (the database's error, raised) when its commit is
        unconfirmed, yet that commit may have been made: once the database is back, what
        it stored is failed before anyone sends it."""
        try:
            yield
        except crud.CommitUnconfirmed as unconfirmed:
            erase = erased(content.text, self.key) if content.sensitive else {}
            self.unrecorded.keep(
                unconfirmed.what,
                partial(
                    crud.withdraw_unconfirmed, unconfirmed=unconfirmed, erase=erase, now=self.now
                ),
            )
            raise unconfirmed.error from None

    # Sending

    def files(
        self, session: Session, notification: Notification
    ) -> tuple[File, ...] | DeliveryError:
        """The files to attach on the notification's current channel (none but on e-mail),
        read in `session` and its transaction ended, so no connection is held while they
        are sent; a transient error if the database is unavailable."""
        if not carries_files(notification):
            return ()
        try:
            files = self.attachments.files(session=session, notification=notification)
            session.commit()
        except DATABASE_UNAVAILABLE as exc:
            self._rollback(session)
            return TransientDeliveryError(
                f"the attachments could not be read: {exc.__class__.__name__}"
            )
        if len(files) < len(notification.attachments or ()):
            return PermanentDeliveryError("an attachment's content is no longer stored")
        return files

    def transmit(
        self, notification: Notification, files: Sequence[File] = ()
    ) -> Receipt | DeliveryError:
        """Hand the message (with `files` attached, on e-mail) to its channel's providers,
        in order while one fails transiently; the receipt, or the last error."""
        senders = self.channels.get(notification.channel)
        if not senders:
            # Queued before a configuration change took the channel away.
            return PermanentDeliveryError(f"the {notification.channel} channel is not configured")
        message = self.decorated(notification, message_for(notification, files))
        error: DeliveryError | None = None
        for sender in senders:
            try:
                return sender.send(message)
            except PermanentDeliveryError as exc:
                return exc
            except DeliveryError as exc:
                error = exc
            except Exception as exc:
                # A bug rather than a delivery failure; still leave a final, explained state.
                logger.exception("notification %d: unexpected error while sending", notification.id)
                return PermanentDeliveryError(f"internal error: {type(exc).__name__}")
        assert error is not None
        return error

    def decorated(self, notification: Notification, message: Message) -> Message:
        """An e-mail as it is sent: under its VERP envelope sender (with BOUNCE_DOMAIN),
        and, if it offers one-click unsubscribe, with the link in both parts and the URL
        for RFC 8058's headers."""
        if notification.channel != Channel.EMAIL:
            return message
        envelope = self.tokens.bounce_address(notification.id)
        if notification.unsubscribe is None:
            return replace(message, envelope_from=envelope)
        url = self.tokens.unsubscribe_url(
            notification.channel, notification.recipient, notification.unsubscribe
        )
        shown = suppression.with_unsubscribe(message.text, message.html, url, notification.locale)
        return replace(
            message, text=shown.text, html=shown.html, unsubscribe_url=url, envelope_from=envelope
        )

    def attempt(
        self,
        notification: Notification,
        *,
        attempt_id: int | None = None,
        number: int | None = None,
        files: Sequence[File] | DeliveryError = (),
        suppressed: str | None = None,
    ) -> tuple[Transition, DeliveryError | None]:
        """One try on the notification's current channel with the `files` of its
        attachments (`files()`; its error is the attempt's), and the transition it makes
        (not stored: the caller stores it); the error, if it failed. The attempt is named
        by its pending row (`attempt_id`, a worker's) or its `number` (a synchronous one).
        A notification `suppressed` on its channel (found right before) is not sent: its
        attempt says why, and the transition moves on as after a refusal."""
        started_at = self.now()
        if suppressed is not None:
            attempt = Attempt.skipped(
                suppressed,
                channel=notification.channel,
                at=started_at,
                attempt_id=attempt_id,
                number=number,
            )
            transition = next_state(
                notification, attempt, self.policy, holder=notification.leased_by or ""
            )
            return transition, None
        result = files if isinstance(files, DeliveryError) else self.transmit(notification, files)
        attempt = Attempt.of(
            result,
            channel=notification.channel,
            started_at=started_at,
            finished_at=self.now(),
            attempt_id=attempt_id,
            number=number,
        )
        transition = next_state(
            notification, attempt, self.policy, holder=notification.leased_by or ""
        )
        return transition, result if isinstance(result, DeliveryError) else None

    def deliver(
        self, *, session: Session, notification: Notification, check: bool = False
    ) -> Notification:
        """Send a notification this request holds, with the quick retries on each channel:
        sent, failed, suppressed or queued. With `check`, each channel's suppressions are
        read again first (a resend: they may have changed since it was accepted).

        Raises `OutcomeNotRecorded` when the database failed after the provider
        answered; the outcome is then kept and stored later.
        """
        try:
            # Still sending after a channel has refused: the next one is tried now.
            while notification.status == NotificationStatus.SENDING:
                self._deliver_on_channel(session, notification, check)
        except LeaseLost:
            # Our lease ran out and another sender claimed the notification: it is theirs.
            session.refresh(notification)
            # The attempts too, now: the response must not query while it is written.
            session.refresh(notification, ["delivery_attempts"])
            session.commit()
            logger.warning("notification %d: lease lost, left to its new owner", notification.id)
            return notification
        logger.info(
            "notification %d %s after %d attempt(s)",
            notification.id,
            notification.status,
            notification.attempts,
        )
        return notification

    def _deliver_on_channel(
        self, session: Session, notification: Notification, check: bool = False
    ) -> None:
        """Try the notification on its current channel with the quick retries, and store
        each attempt; the last one with the state it leaves (sent, queued, failed,
        suppressed, or sending on to the next channel)."""
        final: Transition | None = None
        if check:
            blocked = crud.suppressed_now(
                session=session, notifications=[notification], now=self.now
            ).get(notification.id)
            if blocked is not None:
                transition, _ = self.attempt(
                    notification, number=notification.attempts + 1, suppressed=blocked
                )
                self._store(session, notification, self._in_request(transition))
                return
        files = self.files(session, notification)
        try:
            # copy(): the policy object is shared by every request thread.
            for retry in self.retrying.copy():
                with retry:
                    transition, error = self.attempt(
                        notification, number=notification.attempts + 1, files=files
                    )
                    final = self._in_request(transition)
                    if error is None:
                        self._store(session, notification, final)
                        return
                    logger.warning(
                        "notification %d: attempt %d (%s) failed: %s",
                        notification.id,
                        notification.attempts + 1,
                        notification.channel,
                        error,
                    )
                    # A quick retry may follow: the notification stays sending here.
                    self._store(session, notification, recorded_only(final), keep=final)
                    raise error
        except DeliveryError:
            # The quick retries are over: the state the last attempt leaves.
            assert final is not None
            self._store(session, notification, replace(final, attempt=None))

    def _in_request(self, transition: Transition) -> Transition:
        """A synchronous send goes on at once past a refusal; a channel that spent its
        retries (seconds each) leaves the next one to the queue, due now."""
        attempt = transition.attempt
        refused = attempt is not None and not attempt.sent and not attempt.transient
        if transition.step is not None and refused:
            return holding_on(transition, self.lease)
        return transition

    def _store(
        self,
        session: Session,
        notification: Notification,
        transition: Transition,
        keep: Transition | None = None,
    ) -> None:
        """Store `transition` and show it on `notification`.

        Raises `LeaseLost` if another sender holds the notification now, and
        `OutcomeNotRecorded` if the database failed: then `keep` (settled: no quick retry
        follows a database failure) is kept for `Unrecorded` to store later.
        """
        try:
            applied = crud.apply_transitions(session=session, transitions=[transition], load=True)
        except DATABASE_UNAVAILABLE:
            self._rollback(session)
            kept = keep or transition
            if kept.status == NotificationStatus.SENDING:
                # Moving on to the next channel, but this request cannot send it any more
                # (it answers 503): the queue does, as soon as the database is back.
                kept = replace(
                    kept,
                    status=NotificationStatus.QUEUED,
                    next_attempt_at=kept.at,
                    leased_by=None,
                    lease_expires_at=None,
                )
            self.unrecorded.keep(
                f"notification {kept.notification_id}", partial(self._store_late, [kept])
            )
            logger.error(
                "notification %d: database unavailable, outcome kept to record later",
                kept.notification_id,
            )
            raise OutcomeNotRecorded(kept) from None
        if notification.id not in applied.held:
            raise LeaseLost
        self._announce([transition])

    def settle(self, session: Session, transitions: list[Transition]) -> set[int] | None:
        """Store a worker batch's transitions (`recorder.store`); the ids settled, or None
        if the database failed: then they are kept and stored later."""
        try:
            held = recorder.store(session, transitions)
        except DATABASE_UNAVAILABLE:
            self._rollback(session)
            self.unrecorded.keep(
                f"a batch of {len(transitions)} outcomes", partial(self._store_late, transitions)
            )
            logger.error("database unavailable: %d outcomes kept to record later", len(transitions))
            return None
        self._announce([t for t in transitions if t.notification_id in held])
        return held

    def _store_late(self, transitions: list[Transition], session: Session) -> None:
        """Store transitions kept through an outage (`recorder.store_late`), and announce
        those that held."""
        held = recorder.store_late(session, transitions)
        self._announce([t for t in transitions if t.notification_id in held])

    def release(self, session: Session, *, worker_id: str, leased: list[crud.Leased]) -> None:
        """Give a worker's unattempted notifications back to the queue; if the database
        is down, as soon as it is back (still before their leases run out, mostly)."""
        try:
            crud.release(session=session, worker_id=worker_id, leased=leased, now=self.now)
        except DATABASE_UNAVAILABLE:
            self._rollback(session)
            self.unrecorded.keep(
                f"release of {len(leased)} notifications",
                partial(recorder.release_late, worker_id=worker_id, leased=leased),
            )

    # Operators

    def cancel(self, *, session: Session, notification: Notification) -> Notification:
        """Withdraw a queued notification before a worker sends it; `Conflict` if it is
        not queued (any more)."""
        transition = cancelled(notification, at=self.now(), key=self.key)
        if not crud.change(session=session, notification=notification, transition=transition):
            raise Conflict(f"notification is {notification.status}, only queued ones are cancelled")
        self._announce([transition])
        return notification

    def resend(self, *, session: Session, notification: Notification) -> int:
        """Send a failed notification again from the first channel of its order (or queue
        it, past SYNC_SEND_LIMIT); the status code to answer. `Conflict` if it is not
        failed, or its sensitive text is erased."""
        if notification.text_hmac is not None:
            raise Conflict("the text of this sensitive notification is erased")
        with SyncSlot(self.sync_sends, True) as slot:
            transition = resent(
                notification,
                at=self.now(),
                holder=crud.request_holder() if slot.held else None,
                lease=self.lease,
            )
            # Guarded, so two simultaneous resends cannot both win.
            if not crud.change(session=session, notification=notification, transition=transition):
                raise Conflict(
                    "the text of this sensitive notification is erased"
                    if notification.text_hmac
                    else f"notification is {notification.status}, only failed ones are resent"
                )
            self._announce([transition])
            if slot.held:
                self.deliver(session=session, notification=notification, check=True)
        return outcome_status(notification, sent=HTTPStatus.OK)

    def unsubscribe(self, *, session: Session, found: suppression.Unsubscribe) -> bool:
        """Suppress what a one-click unsubscribe token names (its address, channel and
        scope); whether it is new (a repeat adds nothing)."""
        added = crud.add_suppressions(
            session=session,
            rows=[
                {
                    "channel": found.channel,
                    "address": found.address,
                    "scope": found.scope,
                    "reason": SuppressionReason.UNSUBSCRIBE,
                }
            ],
            now=self.now,
        )
        logger.info("unsubscribe: %s suppressed for %s", found.channel, found.scope)
        return bool(added)

    def _announce(self, transitions: Sequence[Transition]) -> None:
        """Tell every hook what was stored; a failing hook is logged, never fatal."""
        for hook in self.hooks:
            try:
                hook(transitions)
            except Exception:
                logger.exception("a transition hook failed")

    @staticmethod
    def _rollback(session: Session) -> None:
        with suppress(Exception):
            session.rollback()


class NoValidRecipient(Refused):
    """A bulk request none of whose items can be sent (a 422 listing them)."""

    def __init__(self, rejected: list[RejectedRecipient]) -> None:
        super().__init__("no valid recipient", field="recipients")
        self.rejected = rejected
