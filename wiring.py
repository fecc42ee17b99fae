"""The service's objects built from settings, one function each, for every entry point:
the API (main.py's lifespan), the worker process (worker.py), the command line (cli.py)
and the tests. Whatever a function starts, it hands back a way to stop."""

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from channels.base import Sender
from channels.sms_ru import SMSRu
from channels.telegram import TelegramBot
from config import Settings
from db import make_engine, make_session_factory, run_migrations
from delivery import Deliverer
from mailer import EmailChannel, SMTPMailer
from models import Channel, utcnow
from ratelimits import RateLimiter

if TYPE_CHECKING:
    from signing import DkimSigner

logger = logging.getLogger(__name__)


def configure_logging() -> None:
    """Log at INFO to stderr, each line with its time, level and logger."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@dataclass(frozen=True)
class Database:
    """An engine on DATABASE_URL and the session factory bound to it."""

    engine: Engine
    session_factory: sessionmaker[Session]

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()


def build_database(
    settings: Settings,
    *,
    migrate: bool = False,
    pool_size: int | None = None,
    autocommit: bool = False,
) -> Database:
    """The database `settings` name, its schema first brought to the newest migration if
    `migrate` (blocking: an event loop runs this in a thread); see `make_engine` for
    `pool_size` and `autocommit`."""
    engine = make_engine(settings, pool_size=pool_size, autocommit=autocommit)
    if migrate:
        try:
            run_migrations(engine)
        except BaseException:
            engine.dispose()
            raise
    return Database(engine=engine, session_factory=make_session_factory(engine))


def build_deliverer(
    settings: Settings, *, now: Callable[[], datetime] = utcnow
) -> tuple[Deliverer, Callable[[], None]]:
    """The deliverer `settings` describe, and the function that closes its connections and
    stops the local stand-ins it started (in development: the mail catcher, and the
    SMS.ru and Bot API stand-in for channels without settings of their own)."""
    with ExitStack() as stack:
        channels = build_channels(settings, stack)
        deliverer = Deliverer(settings=settings, channels=channels, now=now)
        # Built: what was started keeps running, for the caller to stop.
        started = stack.pop_all()
    return deliverer, started.close


@dataclass(frozen=True)
class HTTPChannel:
    """A channel whose provider is an HTTP API: the setting that configures it (its key),
    and its sender built from settings (`base_url`: a local stand-in's)."""

    key_setting: str
    build: Callable[..., Sender]


# One entry per HTTP channel: adding one is its module, its settings and a line here.
HTTP_CHANNELS: dict[Channel, HTTPChannel] = {
    Channel.SMS: HTTPChannel("sms_ru_api_id", SMSRu.from_settings),
    Channel.TELEGRAM: HTTPChannel("telegram_bot_token", TelegramBot.from_settings),
}


def build_channels(settings: Settings, stack: ExitStack) -> dict[Channel, Sender]:
    """The configured channels; in development, a local stand-in for each one that is not
    (the mail catcher; one SMS.ru and Bot API stand-in). What they start and open is
    closed by `stack` (in reverse: each client says goodbye before its stand-in goes)."""
    channels: dict[Channel, Sender] = {}
    signer = build_signer(settings)
    if settings.uses_dev_mail_catcher:
        # The development stand-ins are imported only where they run (aiosmtpd and the
        # outbox's server are 3 MB of a production process's memory otherwise).
        from devmail import start_mail_catcher

        catcher = start_mail_catcher(settings.dev_mail_dir)
        stack.callback(catcher.stop)
        mailer = SMTPMailer(
            host=catcher.hostname,
            port=catcher.port,
            pool_size=settings.smtp_pool_size,
            max_idle=settings.smtp_max_idle,
        )
        channels[Channel.EMAIL] = EmailChannel(mailer, sender=settings.email_from, signer=signer)
    elif settings.smtp_host:
        mailer = SMTPMailer.from_settings(settings)
        channels[Channel.EMAIL] = EmailChannel(mailer, sender=settings.email_from, signer=signer)
    stand_in_url: str | None = None
    for channel, entry in HTTP_CHANNELS.items():
        if getattr(settings, entry.key_setting) is not None:
            channels[channel] = entry.build(settings)
        elif settings.development:
            if stand_in_url is None:
                from devoutbox import start_outbox

                outbox = start_outbox(settings.dev_outbox_dir)
                stack.callback(outbox.stop)
                stand_in_url = outbox.url
            # The stand-in takes any key: the channel as its settings describe, pointed at it.
            stand_in = settings.model_copy(update={entry.key_setting: SecretStr("development")})
            channels[channel] = entry.build(stand_in, base_url=stand_in_url)
    for sender in channels.values():
        stack.callback(sender.close)
    return channels


def build_signer(settings: Settings) -> "DkimSigner | None":
    """The DKIM signer the settings describe, checked (a probe signed and verified, the
    From domain aligned): `DkimMisconfigured` stops the start-up and says why."""
    if not settings.dkim_domain:
        return None
    from signing import DkimSigner  # dkimpy and cryptography: only where DKIM is on

    signer = DkimSigner.from_settings(settings)
    if signer is not None:
        signer.check(settings.email_from)
        logger.info("DKIM: signing as %s (selector %s)", signer.domain, signer.selector)
    return signer


def build_limiter(settings: Settings) -> RateLimiter:
    """The rate limiter on RATE_LIMIT_STORAGE, its keys under RATE_LIMIT_PREFIX, with the
    Redis timeouts."""
    return RateLimiter(
        settings.rate_limit_storage,
        prefix=settings.rate_limit_prefix,
        connect_timeout=settings.redis_connect_timeout,
        socket_timeout=settings.redis_socket_timeout,
    )
