"""The service's objects built from settings, one function each, for every entry point:
the API (main.py's lifespan), the worker process (worker.py), the command line (cli.py)
and the tests. Whatever a function starts, it hands back a way to stop."""

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from db import make_engine, make_session_factory, run_migrations
from delivery import Deliverer
from devmail import start_mail_catcher
from mailer import SMTPMailer
from ratelimits import RateLimiter


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


def build_deliverer(settings: Settings) -> tuple[Deliverer, Callable[[], None]]:
    """The deliverer `settings` describe, and the function that closes its connections and
    stops the local stand-ins it started (the development mail catcher)."""
    with ExitStack() as stack:
        if settings.uses_dev_mail_catcher:
            catcher = start_mail_catcher(settings.dev_mail_dir)
            stack.callback(catcher.stop)
            mailer = SMTPMailer(
                host=catcher.hostname,
                port=catcher.port,
                pool_size=settings.smtp_pool_size,
                max_idle=settings.smtp_max_idle,
            )
        else:
            mailer = SMTPMailer.from_settings(settings)
        # Stopped in reverse: the mailer says QUIT before its catcher goes.
        stack.callback(mailer.close)
        deliverer = Deliverer.from_settings(settings, mailer=mailer)
        # Built: what was started keeps running, for the caller to stop.
        started = stack.pop_all()
    return deliverer, started.close


def build_limiter(settings: Settings) -> RateLimiter:
    """The rate limiter on RATE_LIMIT_STORAGE, its keys under RATE_LIMIT_PREFIX."""
    return RateLimiter(settings.rate_limit_storage, prefix=settings.rate_limit_prefix)
