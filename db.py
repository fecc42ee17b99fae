"""Engine, sessions and schema migrations."""

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from config import PROJECT_DIR, Settings

logger = logging.getLogger(__name__)

# Connection refused or dropped, pool exhausted: the database, not the request, is at fault.
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def make_engine(settings: Settings, *, pool_size: int | None = None) -> Engine:
    """An engine for `settings.database_url`, tuned per backend."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url,
            pool_size=pool_size or settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout,
            # A connection dropped by a database restart is replaced, not handed out.
            pool_pre_ping=True,
            connect_args={"connect_timeout": 5},
            # Errors are logged; their parameters would carry message texts and codes.
            hide_parameters=True,
        )
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 15}, hide_parameters=True
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers of the history run while a send is being recorded.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Loaded attributes stay readable after commit without a new transaction,
    # so no connection is held while an SMTP conversation runs.
    return sessionmaker(engine, expire_on_commit=False)


def get_session(request: Request) -> Iterator[Session]:
    """The request's session (a FastAPI dependency, shared by all of a request's dependants)."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        # Runs after the response has started: a rollback on a connection the database
        # dropped must not break it (every unit of work has committed by then).
        try:
            session.close()
        except Exception as exc:
            logger.warning("closing a database session failed: %s", exc)


class ReadinessProbe:
    """`SELECT 1` on a connection of its own, in a thread of its own, with a timeout: the
    answer never waits for request threads or the request pool."""

    def __init__(self, engine: Engine, timeout: float = 1.0) -> None:
        self.engine = engine
        self.timeout = timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readiness")

    def _check(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    async def ready(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._thread, self._check), self.timeout)
        except (TimeoutError, *DATABASE_UNAVAILABLE) as exc:
            logger.warning("not ready: database unavailable (%s)", type(exc).__name__)
            return False
        return True

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def alembic_config() -> Config:
    return Config(str(PROJECT_DIR / "alembic.ini"))


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection to migrate on, in one transaction.

    On SQLite, foreign keys are off meanwhile: Alembic's batch mode rebuilds a table by
    copying it and dropping the original, and with them on that DROP would cascade into
    the tables that reference it (delivery attempts). They are checked before commit.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                yield connection
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError("a migration left rows with dangling foreign keys")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def run_migrations(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    config = alembic_config()
    with migration_connection(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    logger.info("database schema is up to date")
