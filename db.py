"""Engine, sessions and schema migrations."""

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from config import PROJECT_DIR, Settings

logger = logging.getLogger(__name__)


def make_engine(settings: Settings) -> Engine:
    """An engine for `settings.database_url`, tuned per backend."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url,
            pool_size=settings.db_pool_size,
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


def alembic_config() -> Config:
    return Config(str(PROJECT_DIR / "alembic.ini"))


def run_migrations(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    logger.info("database schema is up to date")
