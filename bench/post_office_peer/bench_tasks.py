"""What bench/peer.py asks of the peer's venv; each subcommand prints one JSON object.

    createdb ADMIN_URL NAME   a new database on ADMIN_URL's server
    dropdb ADMIN_URL NAME     drop it (connections closed by force)
    enqueue --count N ...     N e-mails through post_office.mail.send_many; times that call
    status                    e-mails per status, and the Log rows

enqueue and status use the Django project beside this file (DATABASE_URL in the environment).
"""

import argparse
import itertools
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

# Appended to the text until the message has the size of the service's (see pad_text).
POSTSCRIPT = "Если планы изменятся, отмените бронирование в личном кабинете.\n"


def admin_connection(admin_url: str) -> Any:
    import psycopg2

    connection = psycopg2.connect(admin_url)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return connection


def createdb(admin_url: str, name: str) -> dict[str, Any]:
    connection = admin_connection(admin_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    return {"created": name}


def dropdb(admin_url: str, name: str) -> dict[str, Any]:
    connection = admin_connection(admin_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()
    return {"dropped": name}


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    import django

    django.setup()


def pad_text(text: str, size: Callable[[str], int], target: int) -> str:
    """`text` with a Cyrillic postscript that brings the message to `target` bytes.

    Django sends a UTF-8 body as 8bit, the service as quoted-printable (three bytes per
    byte outside ASCII): the same text makes a smaller message here, so it is lengthened
    until both put the same number of bytes on the wire.
    """
    budget = target - size(text) - 1  # the newline before the postscript
    if budget <= 0:
        return text
    chars: list[str] = []
    used = 0
    for char in itertools.cycle(POSTSCRIPT):
        width = len(char.encode())
        if used + width > budget:
            break
        chars.append(char)
        used += width
    return text + "\n" + "".join(chars) + " " * (budget - used)  # at most one space


def versions() -> dict[str, str]:
    packages = ("django", "django-post_office", "psycopg2-binary")
    return {"python": platform.python_version()} | {p: version(p) for p in packages}


def enqueue(
    *, count: int, sender: str, subject: str, text: str, domain: str, message_bytes: int
) -> dict[str, Any]:
    setup_django()
    from django.conf import settings
    from django.db import transaction
    from post_office import mail
    from post_office.models import Email

    def size(body: str) -> int:
        """The message post_office sends for `body`, whole, with \n line ends (as ours is)."""
        with transaction.atomic():  # the probe is stored (it needs an id), then rolled back
            probe = mail.create(sender, [f"member1@{domain}"], subject=subject, message=body)
            size = len(probe.prepare_email_message().message().as_bytes())
            transaction.set_rollback(True)
        return size

    body = pad_text(text, size, message_bytes)
    kwargs_list = [
        {
            "sender": sender,
            "recipients": [f"member{i}@{domain}"],
            "subject": subject,
            "message": body,
        }
        for i in range(count)
    ]
    started = time.perf_counter()
    mail.send_many(kwargs_list)
    seconds = time.perf_counter() - started
    stored = Email.objects.count()
    if stored != count:
        raise RuntimeError(f"send_many stored {stored} of {count}")
    return {
        "enqueue_s": seconds,
        "stored": stored,
        "message_bytes": size(body),
        "padding_chars": len(body) - len(text),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": versions(),
        "post_office_settings": settings.POST_OFFICE,
    }


def status() -> dict[str, Any]:
    setup_django()
    from django.db.models import Count
    from post_office.models import STATUS, Email, Log

    names = dict(enumerate(STATUS._fields))
    rows = Email.objects.values_list("status").annotate(n=Count("id"))
    counts = {names.get(code, str(code)): n for code, n in rows}
    return {"emails": counts, "logs": Log.objects.count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("createdb", "dropdb"):
        database = commands.add_parser(name)
        database.add_argument("admin_url")
        database.add_argument("name")
    queue = commands.add_parser("enqueue")
    queue.add_argument("--count", type=int, required=True)
    queue.add_argument("--sender", required=True)
    queue.add_argument("--subject", required=True)
    queue.add_argument("--text", required=True)
    queue.add_argument("--domain", required=True, help="recipients are member<i>@DOMAIN")
    queue.add_argument("--message-bytes", type=int, required=True)
    commands.add_parser("status")
    args = parser.parse_args()
    result: dict[str, Any]
    if args.command == "createdb":
        result = createdb(args.admin_url, args.name)
    elif args.command == "dropdb":
        result = dropdb(args.admin_url, args.name)
    elif args.command == "enqueue":
        result = enqueue(
            count=args.count,
            sender=args.sender,
            subject=args.subject,
            text=args.text,
            domain=args.domain,
            message_bytes=args.message_bytes,
        )
    else:
        result = status()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
