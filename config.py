"""Service settings, read once from the environment and `.env`."""

import re
import secrets
from email.utils import parseaddr
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from headers import header_problem

PROJECT_DIR = Path(__file__).resolve().parent


class SMTPSecurity(StrEnum):
    """How the SMTP connection is protected."""

    NONE = "none"
    STARTTLS = "starttls"
    SSL = "ssl"


class Environment(StrEnum):
    """Where the service runs. Development starts local stand-ins for what is not
    configured (a mail catcher, SMS.ru and Bot API stand-ins), generates SECRET_KEY and a
    development API key; production starts none of them and requires SECRET_KEY."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Every knob of the service; field names double as environment variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # repr=False: the URL may carry the database password.
    database_url: str = Field(
        default=f"sqlite:///{PROJECT_DIR / 'var' / 'notifications.db'}", repr=False
    )
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_timeout: float = Field(default=5.0, gt=0)
    auto_migrate: bool = True

    # Unset: development when SMTP_HOST is empty, production otherwise (the rule before
    # ENVIRONMENT existed). An SMS- or Telegram-only deployment sets production.
    environment: Environment | None = None

    # Empty: in development, the embedded mail catcher; in production, no e-mail channel.
    smtp_host: str = ""
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SMTPSecurity = SMTPSecurity.NONE
    smtp_verify_tls: bool = True
    smtp_ca_file: Path | None = None
    smtp_timeout: float = Field(default=10.0, gt=0)
    # Connections open at once (shared by API requests and the in-API worker), and how
    # long an idle one is kept for reuse (0: a new connection per message).
    smtp_pool_size: int = Field(default=8, ge=1)
    smtp_max_idle: float = Field(default=30.0, ge=0)
    email_from: str = "Coworking <noreply@coworking.local>"

    # SMS through SMS.ru (https://sms.ru/api/send). Without SMS_RU_API_ID the SMS channel
    # is not configured (a 422 names it), except in development, where a local stand-in
    # writes each message to DEV_OUTBOX_DIR.
    sms_ru_api_id: SecretStr | None = None
    sms_ru_url: str = "https://sms.ru"
    # The sender name SMS.ru shows, once approved there; its default otherwise.
    sms_from: str | None = None
    # Telegram through the Bot API. The token is part of every request's URL: neither is
    # ever logged.
    telegram_bot_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org"
    # The HTTP channels: seconds per request, and connections kept per provider.
    channel_timeout: float = Field(default=10.0, gt=0)
    channel_pool_size: int = Field(default=8, ge=1)
    # Tried in this order, unless the request or the recipient gives its own; a channel
    # with no address for the recipient is skipped. Comma-separated: email,sms,telegram.
    channel_order: Annotated[list[str], NoDecode] = ["email", "sms", "telegram"]
    # A channel with another after it in the order is left after this many attempts
    # (the last one gets QUEUE_MAX_ATTEMPTS): a code should not wait hours for SMS.
    fallback_after_attempts: int = Field(default=3, ge=1)
    dev_outbox_dir: Path = PROJECT_DIR / "var" / "outbox"

    retry_attempts: int = Field(default=3, ge=1)
    retry_max_time: float = Field(default=30.0, gt=0)
    retry_initial_wait: float = Field(default=0.5, ge=0)
    retry_max_wait: float = Field(default=5.0, ge=0)
    retry_jitter: float = Field(default=0.5, ge=0)

    # The background worker: queued, scheduled and background-retried notifications.
    worker_in_api: bool = True
    worker_batch_size: int = Field(default=500, ge=1)
    worker_poll_interval: float = Field(default=1.0, gt=0)
    worker_lease: float = Field(default=120.0, gt=0)
    queue_max_attempts: int = Field(default=8, ge=1)
    queue_retry_initial_wait: float = Field(default=30.0, ge=0)
    queue_retry_max_wait: float = Field(default=3600.0, ge=0)

    # Idempotency-Key: how long a key is remembered, and how long a repeat waits for the
    # first request (a synchronous send) to finish before answering 409.
    idempotency_key_ttl: float = Field(default=86_400.0, gt=0)
    # The wait holds a request thread, so it is short; a longer send answers 409.
    idempotency_wait: float = Field(default=10.0, ge=0)

    # Synchronous sends in progress at once per process; more are queued (202), so slow
    # SMTP can never take every request thread.
    sync_send_limit: int = Field(default=16, ge=1)
    # How far ahead (and behind) `send_at` may be; a time in the past is due at once.
    send_at_horizon: float = Field(default=366 * 86_400.0, gt=0)

    # Templates: the coworking as the shipped layouts name it (`brand.name`, `brand.url`,
    # `brand.support_email` in a template), and whether the API installs the shipped
    # catalogue (templates/) at start-up; `python cli.py templates install` does it too.
    brand_name: str = "Коворкинг «Точка»"
    brand_url: str = "http://127.0.0.1:8003"
    brand_support_email: str = "support@coworking.local"
    templates_install: bool = True

    # Attachments (POST /attachments, or inline base64 in a send): what an e-mail may
    # weigh once encoded (its text, HTML and every attachment in base64), the content
    # types taken, and how long an attachment no notification refers to is kept.
    attachment_max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=64 * 1024)
    attachment_types: Annotated[list[str], NoDecode] = [
        "application/pdf",
        "image/png",
        "image/jpeg",
        "image/gif",
        "text/plain",
        "text/csv",
        "text/calendar",
        "application/zip",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ]
    attachment_retention: float = Field(default=7 * 86_400.0, gt=0)

    # Deliverability. DKIM: every e-mail signed rsa-sha256 for DKIM_DOMAIN (aligned with
    # EMAIL_FROM's domain) under DKIM_SELECTOR, with DKIM_PRIVATE_KEY (a PEM, or the path
    # of one); `python cli.py dkim record` prints the TXT record to publish. Unset: unsigned.
    dkim_domain: str | None = None
    dkim_selector: str = "notify"
    dkim_private_key: SecretStr | None = None
    # Where recipients reach this service: the one-click unsubscribe links.
    public_base_url: str = "http://127.0.0.1:8003"
    # Bounces: with BOUNCE_DOMAIN set, mail goes out with the envelope sender
    # bounces+<token>@BOUNCE_DOMAIN, whose MX must lead to the inbound listener
    # (`python cli.py inbound`, INBOUND_HOST:INBOUND_PORT), which reads DSNs and ARF reports.
    bounce_domain: str | None = None
    inbound_host: str = "127.0.0.1"
    inbound_port: int = Field(default=8025, ge=1, le=65535)
    # What the listener takes of one report (larger ones are refused: 552), and how long
    # reports are kept (the worker forgets older ones).
    inbound_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    inbound_report_retention: float = Field(default=30 * 86_400.0, gt=0)

    # Keys the HMACs kept instead of erased sensitive texts and of idempotency
    # fingerprints. Required with a real SMTP server; generated in development.
    secret_key: SecretStr | None = None
    dev_secret_key_file: Path = PROJECT_DIR / "var" / "secret-key"

    # Access control. BOOTSTRAP_API_KEY becomes a key with every scope (deployments, tests);
    # in development (no SMTP_HOST) a key is created in DEV_API_KEY_FILE if none works.
    bootstrap_api_key: SecretStr | None = None
    rate_limit_requests_per_minute: int = Field(default=600, ge=1)
    # How long a process keeps a valid key it has looked up (0: look up every request).
    # A revocation reaches every process at once through the rate-limit storage (Redis);
    # with `memory://` one made by another process (the command line) waits this long.
    api_key_cache_ttl: float = Field(default=30.0, ge=0)
    rate_limit_per_recipient_per_hour: int = Field(default=20, ge=1)
    # Where the moving-window counters live: `memory://` counts per process (development,
    # one process); `redis://host:6379/0` is shared by every process and replica.
    rate_limit_storage: str = Field(default="memory://", repr=False)
    # Keys in that storage start with this: deployments sharing one Redis keep apart.
    rate_limit_prefix: str = "notify"
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    http_header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a connection has to send a request's headers, from its start "
        "(or a request's first byte) on; then it is closed (serving.py). Idle keep-alive "
        "connections close after uvicorn's --timeout-keep-alive (5 s).",
    )

    # A dependency that accepts connections and never answers costs a request this long,
    # then a 503 naming it: without them a request waits until the dependency comes back.
    database_connect_timeout: int = Field(
        default=5,
        ge=1,
        description="Seconds to wait for a PostgreSQL connection, its start-up included "
        "(libpq's connect_timeout: whole seconds).",
    )
    database_statement_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a PostgreSQL statement may run before the server cancels it "
        "(0: no limit). Migrations run without it.",
    )
    redis_connect_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds to wait for a TCP connection to the Redis of RATE_LIMIT_STORAGE.",
    )
    redis_socket_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds to wait for each answer of the Redis of RATE_LIMIT_STORAGE; a "
        "request that meets it is a 503 naming the rate-limit storage.",
    )

    dev_mail_dir: Path = PROJECT_DIR / "var" / "mail"
    dev_api_key_file: Path = PROJECT_DIR / "var" / "dev-api-key"

    @field_validator("email_from")
    @classmethod
    def safe_sender(cls, sender: str) -> str:
        problem = header_problem(sender)
        if problem is None and "=?" in parseaddr(sender)[1]:
            problem = "must not hold an encoded word (RFC 2047) in its address"
        if problem is not None:
            raise ValueError(problem)
        return sender

    @field_validator("database_url")
    @classmethod
    def use_psycopg2(cls, url: str) -> str:
        """Pin bare PostgreSQL URLs to psycopg2 (SQLAlchemy 2.1 would pick psycopg 3)."""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg2://" + url.removeprefix(prefix)
        return url

    @field_validator(
        "sms_ru_api_id",
        "telegram_bot_token",
        "sms_from",
        "dkim_domain",
        "dkim_private_key",
        "bounce_domain",
        mode="before",
    )
    @classmethod
    def empty_is_unset(cls, value: object) -> object:
        """`SMS_RU_API_ID=` (compose's `${SMS_RU_API_ID:-}`) leaves the channel unconfigured."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("public_base_url")
    @classmethod
    def http_url(cls, url: str) -> str:
        """An ASCII http(s) URL: it goes into a mail header as it is."""
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/-]*)?", url):
            raise ValueError("must be an http(s) URL of ASCII letters, digits and . _ ~ / -")
        return url.rstrip("/")

    @field_validator("channel_order", "attachment_types", mode="before")
    @classmethod
    def comma_separated(cls, order: object) -> object:
        if isinstance(order, str):
            return [name.strip() for name in order.split(",") if name.strip()]
        return order

    @field_validator("channel_order")
    @classmethod
    def known_channels(cls, order: list[str]) -> list[str]:
        known = ("email", "sms", "telegram")
        unknown = [name for name in order if name not in known]
        if unknown or not order or len(set(order)) != len(order):
            raise ValueError(f"must name each of {', '.join(known)} at most once, in order")
        return order

    @model_validator(mode="after")
    def secret_key_in_production(self) -> "Settings":
        if not self.development and self.secret_key is None:
            raise ValueError("SECRET_KEY is required in production (ENVIRONMENT, SMTP_HOST)")
        # An empty or short key would make the HMACs guessable.
        if self.secret_key is not None and len(self.secret_key.get_secret_value()) < 16:
            raise ValueError("SECRET_KEY must be at least 16 characters")
        return self

    @property
    def development(self) -> bool:
        """ENVIRONMENT=development, or ENVIRONMENT unset and SMTP_HOST empty."""
        if self.environment is None:
            return not self.smtp_host
        return self.environment == Environment.DEVELOPMENT

    @property
    def uses_dev_mail_catcher(self) -> bool:
        return self.development and not self.smtp_host

    def brand(self) -> dict[str, str]:
        """What every template is given as `brand`."""
        return {
            "name": self.brand_name,
            "url": self.brand_url,
            "support_email": self.brand_support_email,
        }

    def hmac_key(self) -> bytes:
        """SECRET_KEY, or in development a random key kept in DEV_SECRET_KEY_FILE."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.dev_secret_key_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip().encode()
