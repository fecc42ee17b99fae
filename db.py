"""Engine, sessions and schema migrations."""

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from config import PROJECT_DIR, Settings

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

# Connection refused or dropped, pool exhausted: the database, not the request, is at fault.
DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
# Do not compare a conditional UPDATE's WHERE with the objects in the session: it would
# change an object even when the row did not match (and the row is what counts).
NO_SYNC = {"synchronize_session": False}


def make_engine(
    settings: Settings, *, pool_size: int | None = None, autocommit: bool = False
) -> Engine:
    """An engine for `settings.database_url`, tuned per backend; `autocommit`: each
    statement commits on its own (an engine of its own, so its connections never switch
    modes, which costs a SET per checkin)."""
    url = make_url(settings.database_url)
    isolation = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url,
            **isolation,
            pool_size=pool_size or settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout,
            # No pre-ping (a round trip per checkout): a connection dropped by a database
            # restart fails its request (a 503), and that error invalidates every older
            # connection of the pool, so the next requests connect afresh.
            connect_args=_postgresql_timeouts(settings),
            # Errors are logged; their parameters would carry message texts and codes.
            hide_parameters=True,
            json_serializer=_json,
        )
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 15},
        hide_parameters=True,
        json_serializer=_json,
        **isolation,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _json(value: Any) -> str:
    """JSON columns as UTF-8 text: a rendered Russian snapshot escaped as \\uXXXX would
    take three times its bytes (a templated bulk's insert is mostly its snapshots). A
    string no UTF-8 can hold (an unpaired surrogate) stays escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text


def _postgresql_timeouts(settings: Settings) -> dict[str, Any]:
    """psycopg2's arguments for DATABASE_CONNECT_TIMEOUT and DATABASE_STATEMENT_TIMEOUT."""
    timeouts: dict[str, Any] = {"connect_timeout": settings.database_connect_timeout}
    if settings.database_statement_timeout:
        # Set at connect time, so no statement of any session runs without it.
        milliseconds = max(1, round(settings.database_statement_timeout * 1000))
        timeouts["options"] = f"-c statement_timeout={milliseconds}"
    return timeouts


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers of the history run while a send is being recorded.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def dialect_insert(session: Session, entity: Any) -> Any:
    """An INSERT of `entity` with ON CONFLICT (PostgreSQL's, or SQLite's), for the
    session's database."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(entity)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Loaded attributes stay readable after commit without a new transaction,
    # so no connection is held while an SMTP conversation runs.
    return sessionmaker(engine, expire_on_commit=False)


class ReadinessProbe:
    """`SELECT 1` on a connection of its own and a ping of the rate-limit storage, each in
    a thread of its own with a timeout, side by side: the answer never waits for request
    threads or the request pool, and names the dependency that did not answer (one that
    stalls holds its own thread, never the other's)."""

    def __init__(
        self,
        engine: Engine,
        timeout: float = 1.0,
        *,
        storage_check: Callable[[], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.timeout = timeout
        # In the order a failure is named when more than one fails.
        self._checks: dict[str, Callable[[], bool]] = {"database": self._select_one}
        if storage_check is not None:
            self._checks["rate-limit storage"] = storage_check
        self._threads = {
            name: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"readiness-{name}")
            for name in self._checks
        }

    def _select_one(self) -> bool:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True

    async def _answers(self, name: str) -> bool:
        loop = asyncio.get_running_loop()
        try:
            answered = await asyncio.wait_for(
                loop.run_in_executor(self._threads[name], self._checks[name]), self.timeout
            )
        except (TimeoutError, *DATABASE_UNAVAILABLE) as exc:
            logger.warning("not ready: %s unavailable (%s)", name, type(exc).__name__)
            return False
        if not answered:
            logger.warning("not ready: %s unavailable", name)
        return answered

    async def unavailable(self) -> str | None:
        """What is not answering ("database", "rate-limit storage"), or None: ready."""
        names = list(self._checks)
        answers = await asyncio.gather(*(self._answers(name) for name in names))
        return next((name for name, ok in zip(names, answers, strict=True) if not ok), None)

    def close(self) -> None:
        for thread in self._threads.values():
            thread.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def alembic_config() -> "Config":
    # Imported here: Alembic and Mako are 3 MB of every server process's memory, which
    # needs them only when AUTO_MIGRATE is on (the image migrates before it starts them).
    from alembic.config import Config

    return Config(str(PROJECT_DIR / "alembic.ini"))


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection to migrate on, in one transaction.

    On PostgreSQL, without DATABASE_STATEMENT_TIMEOUT (a migration may rewrite a big
    table, and replicas starting at once wait for each other's migration lock). On SQLite,
    foreign keys are off meanwhile: Alembic's batch mode rebuilds a table by copying it and
    dropping the original, and with them on that DROP would cascade into the tables that
    reference it (delivery attempts). They are checked before commit.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    # LOCAL: the pooled connection gets its timeout back at commit.
                    connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                yield connection
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError("a migration left rows with dangling foreign keys")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def run_migrations(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    from alembic import command

    config = alembic_config()
    with migration_connection(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    logger.info("database schema is up to date")
