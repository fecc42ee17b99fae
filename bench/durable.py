"""The hand-written durable reference (W2): what a careful engineer writes in an afternoon.

A sync FastAPI route: a Pydantic body with email-validator, a constant-time bearer check,
one `INSERT … RETURNING` with SQLAlchemy Core on a small pool, synchronous_commit left on,
and a 202. It sends nothing and has no keys, limits or history: the cost floor of a
durable accept. Kept only to be measured, under the same `uvicorn --workers` as ours.
"""

import hmac
import os
from datetime import UTC, datetime

from fastapi import FastAPI, Header, HTTPException, status
from pydantic import BaseModel, EmailStr, Field
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
)

TOKEN = os.environ["DURABLE_TOKEN"].encode()
engine = create_engine(
    os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg2://", 1),
    pool_size=8,
    max_overflow=0,
)
# The table is the bench's (`bench/run.py` creates it with DURABLE_TABLE), not a migration's.
metadata = MetaData()
accepted = Table(
    "durable_accepted",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("email", String(320), nullable=False),
    Column("subject", String(998), nullable=False),
    Column("text", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
app = FastAPI()


class EmailIn(BaseModel):
    email: EmailStr
    subject: str = Field(min_length=1, max_length=998)
    text: str = Field(min_length=1, max_length=100_000)


class Accepted(BaseModel):
    id: int
    status: str


@app.post("/notify/email", status_code=status.HTTP_202_ACCEPTED)
def notify_email(data: EmailIn, authorization: str = Header(default="")) -> Accepted:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), TOKEN):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid token")
    with engine.begin() as connection:
        row_id = connection.execute(
            insert(accepted)
            .values(**data.model_dump(), status="queued", created_at=datetime.now(UTC))
            .returning(accepted.c.id)
        ).scalar_one()
    return Accepted(id=row_id, status="queued")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
