"""The smallest Django project that runs django-post_office for the bench (bench/peer.py).

It runs in bench/.peer-venv, never in the service's venv. The environment says where things are:

    DATABASE_URL   postgresql://user[:password]@host[:port]/name[?option=value]  (required)
    SMTP_HOST      the SMTP server the queue delivers to (127.0.0.1)
    SMTP_PORT      its port (25)
    POST_OFFICE_BATCH_SIZE, POST_OFFICE_THREADS_PER_PROCESS   to try other values than below
"""

import os
from urllib.parse import parse_qsl, unquote, urlsplit


def database_from_url(url: str) -> dict[str, object]:
    """Django's DATABASES entry for a postgresql:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DATABASE_URL must be a postgresql:// URL, not {parts.scheme}://")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }


SECRET_KEY = "post-office-bench-not-secret"
DEBUG = False  # DEBUG keeps every query in memory
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = ["post_office"]
DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
# post_office renders every subject and message as a Django template when it queues them.
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]

# Django's own SMTP backend, plain SMTP to the bench's smtp-sink.
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = os.environ.get("SMTP_HOST", "127.0.0.1")
EMAIL_PORT = int(os.environ.get("SMTP_PORT", "25"))
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = "Coworking <noreply@coworking.local>"

# send_queued_mail loops over batches until the queue is empty: each batch is one SELECT of
# BATCH_SIZE queued e-mails (default 100), a fresh multiprocessing pool of --processes forked
# workers, each with THREADS_PER_PROCESS threads (default 5) holding one SMTP connection each,
# closed at the end of the batch, then one UPDATE of the sent ones and a bulk INSERT of their
# logs. A larger batch spreads the fork, the connects and the queries over more messages: with
# 10,000 e-mails into smtp-sink on this 2-core machine, 100 gave about 800 msg/s and 1,000
# 1,200-1,750; 5,000 and 10,000 were within that noise for 30-70 MB more per process. The
# threads made no measurable difference (1, 5 or 10), so they keep the default.
# BATCH_DELIVERY_TIMEOUT (default 180 s) bounds one batch, far above the 1 s one takes here.
# Only one send_queued_mail runs at a time: it takes a lock file (--lockfile, default
# <tmp>/LOCK_FILE_NAME) and exits at once if another holds it, so bench/peer.py passes its own.
POST_OFFICE = {
    "BATCH_SIZE": int(os.environ.get("POST_OFFICE_BATCH_SIZE", "1000")),
    "THREADS_PER_PROCESS": int(os.environ.get("POST_OFFICE_THREADS_PER_PROCESS", "5")),
    "BATCH_DELIVERY_TIMEOUT": 180,
    # The default: a Log row per delivery, as the service stores an attempt per delivery.
    "LOG_LEVEL": 2,
    # A Message-ID made and stored when queued, in our domain, as the service does.
    "MESSAGE_ID_ENABLED": True,
    "MESSAGE_ID_FQDN": "coworking.local",
}
