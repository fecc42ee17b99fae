"""Alembic environment: the URL comes from the service settings."""

from logging.config import fileConfig
from typing import Literal

from alembic import context
from sqlalchemy import Connection, text

from config import Settings
from db import make_engine, migration_connection
from models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# Any fixed number; every replica migrating at start-up waits on the same lock.
MIGRATION_LOCK_ID = 7_300_431


def render_item(type_: str, obj: object, autogen_context: object) -> str | Literal[False]:
    """Write our column types as their plain SQL type, so migrations never import models."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # Called from the service (db.run_migrations): logging is already set up.
        run_with(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = make_engine(Settings())
    with migration_connection(engine) as connection:
        run_with(connection)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
