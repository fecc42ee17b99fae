"""The command line, on the service's settings and database.

    python cli.py migrate [--if-enabled]   the schema to the newest migration
    python cli.py keys create NAME --scopes send,read [--requests-per-minute N]
                                   [--recipient-hourly-limit N]
    python cli.py keys list
    python cli.py keys revoke NAME
    python cli.py templates install
    python cli.py attachments expire
    python cli.py dkim record          the DNS TXT record of DKIM_PRIVATE_KEY's public half
    python cli.py dkim keygen FILE     a new 2048-bit RSA key, written to FILE (mode 0600)
    python cli.py inbound              the bounce and complaint listener (INBOUND_PORT)

A key is printed once, when it is created. A revocation is written to the database and
announced in the rate-limit storage (RATE_LIMIT_STORAGE, RATE_LIMIT_PREFIX), so the
running processes that share it refuse the key on its next request.
"""

import argparse
import os
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import crud
import inbound
from attachments import Attachments
from auth import Scope, announce_revocation, issue_key
from catalogue import Catalogue
from config import Settings
from signing import DkimMisconfigured, DkimSigner, new_key
from suppression import Tokens
from templating import Renderer
from wiring import build_database, build_limiter, configure_logging

Command = Callable[[argparse.Namespace, Settings], None]


class CommandError(Exception):
    """The command cannot do what it was asked: printed with its usage, exit status 2."""


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; `argv` defaults to the process's arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        run(args, Settings())
    except CommandError as exc:
        args.usage.error(str(exc))


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command group: migrate, keys, templates, attachments, dkim,
    inbound."""
    parser = argparse.ArgumentParser(
        prog="python cli.py", description="The notification service's command line."
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    migrate = groups.add_parser(
        "migrate", help="apply the database migrations (what AUTO_MIGRATE does at start-up)"
    )
    migrate.add_argument(
        "--if-enabled",
        action="store_true",
        help="only if AUTO_MIGRATE is on (as the service reads it: false, 0, off … are off)",
    )
    migrate.set_defaults(run=migrate_database, usage=migrate)
    add_key_commands(groups)
    add_template_commands(groups)
    add_attachment_commands(groups)
    add_deliverability_commands(groups)
    return parser


def migrate_database(args: argparse.Namespace, settings: Settings) -> None:
    """Bring the schema to the newest migration (with --if-enabled, only where AUTO_MIGRATE
    is on): the image runs this once before its server processes, which then need no
    Alembic in memory."""
    configure_logging()
    if args.if_enabled and not settings.auto_migrate:
        print("AUTO_MIGRATE is off: not migrated")
        return
    with closing(build_database(settings, migrate=True)):
        pass


def add_deliverability_commands(
    groups: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> None:
    """The `dkim` group (the record to publish, a new key) and the `inbound` listener."""
    dkim = groups.add_parser("dkim", help="DKIM keys and their DNS record")
    commands = dkim.add_subparsers(dest="command", required=True, metavar="COMMAND")
    record = commands.add_parser("record", help="print the TXT record to publish")
    record.set_defaults(run=print_dkim_record, usage=record)
    keygen = commands.add_parser("keygen", help="write a new 2048-bit RSA private key")
    keygen.add_argument("file", type=Path)
    keygen.set_defaults(run=write_dkim_key, usage=keygen)
    inbound = groups.add_parser(
        "inbound", help="run the inbound SMTP listener for bounces and complaints"
    )
    inbound.set_defaults(run=run_inbound, usage=inbound)


def print_dkim_record(args: argparse.Namespace, settings: Settings) -> None:
    """Print the name and value of the TXT record of the configured DKIM key."""
    try:
        signer = DkimSigner.from_settings(settings)
    except DkimMisconfigured as exc:
        raise CommandError(str(exc)) from None
    if signer is None:
        raise CommandError("DKIM_DOMAIN is not set")
    print(f"{signer.dns_name()}. IN TXT")
    # A TXT string holds 255 characters at most: the value split into quoted strings.
    value = signer.dns_record()
    print(" ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255)))


def write_dkim_key(args: argparse.Namespace, settings: Settings) -> None:
    """Write a new private key to FILE, readable by its owner only."""
    path: Path = args.file
    if path.exists():
        raise CommandError(f"{path} exists; not overwritten")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(new_key())
    print(f"written {path}; set DKIM_PRIVATE_KEY={path} and publish `python cli.py dkim record`")


def run_inbound(args: argparse.Namespace, settings: Settings) -> None:
    """Serve the inbound listener until SIGTERM or SIGINT."""
    configure_logging()
    with closing(build_database(settings, migrate=settings.auto_migrate)) as database:
        inbound.serve(settings, database.session_factory, Tokens.from_settings(settings))


def add_template_commands(groups: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The `templates` group: install the shipped catalogue (templates/)."""
    templates = groups.add_parser("templates", help="manage templates")
    commands = templates.add_subparsers(dest="command", required=True, metavar="COMMAND")
    install = commands.add_parser(
        "install", help="install the shipped templates: a new version where a file changed"
    )
    install.set_defaults(run=install_templates, usage=install)


def install_templates(args: argparse.Namespace, settings: Settings) -> None:
    """Install the catalogue and print what became a new version."""
    catalogue = Catalogue(Renderer(brand=settings.brand()))
    with (
        closing(build_database(settings, migrate=settings.auto_migrate)) as database,
        database.session_factory() as session,
    ):
        installed = catalogue.install(session)
    print("\n".join(installed) if installed else "every template is up to date")


def add_attachment_commands(
    groups: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> None:
    """The `attachments` group: delete the expired ones (the worker does it too)."""
    attachments = groups.add_parser("attachments", help="manage attachments")
    commands = attachments.add_subparsers(dest="command", required=True, metavar="COMMAND")
    expire = commands.add_parser(
        "expire",
        help="delete the attachments no notification refers to, ATTACHMENT_RETENTION after "
        "their upload",
    )
    expire.set_defaults(run=expire_attachments, usage=expire)


def expire_attachments(args: argparse.Namespace, settings: Settings) -> None:
    """Delete the expired attachments and print how many went."""
    with (
        closing(build_database(settings, migrate=settings.auto_migrate)) as database,
        database.session_factory() as session,
    ):
        expired = Attachments(settings).expire(session=session)
    print(f"{expired} expired attachment(s) deleted")


def add_key_commands(groups: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The `keys` group: create, list, revoke."""
    keys = groups.add_parser("keys", help="manage API keys", description="Manage API keys.")
    commands = keys.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--scopes",
        type=scopes,
        default=[Scope.SEND],
        metavar="SCOPES",
        help="comma-separated: send, read, admin (default: send)",
    )
    create.add_argument("--requests-per-minute", type=positive, metavar="N")
    create.add_argument("--recipient-hourly-limit", type=positive, metavar="N")
    create.set_defaults(run=create_key, usage=create)
    listing = commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.set_defaults(run=list_keys, usage=listing)
    revoke = commands.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(run=revoke_key, usage=revoke)


def create_key(args: argparse.Namespace, settings: Settings) -> None:
    """Store a new key and print it (the only time it is shown)."""
    with (
        closing(build_database(settings, migrate=settings.auto_migrate)) as database,
        database.session_factory() as session,
    ):
        if crud.get_api_key_by_name(session=session, name=args.name):
            raise CommandError(f"a key named {args.name!r} exists")
        _, key = issue_key(
            session=session,
            name=args.name,
            scopes=args.scopes,
            requests_per_minute=args.requests_per_minute,
            recipient_hourly_limit=args.recipient_hourly_limit,
        )
    print(key)


def list_keys(args: argparse.Namespace, settings: Settings) -> None:
    """Print each key's name, prefix, scopes and state, one a line."""
    with (
        closing(build_database(settings, migrate=settings.auto_migrate)) as database,
        database.session_factory() as session,
    ):
        for record in crud.list_api_keys(session=session):
            state = "revoked" if record.revoked_at else "active"
            print(f"{record.name}\t{record.prefix}…\t{record.scopes}\t{state}")


def revoke_key(args: argparse.Namespace, settings: Settings) -> None:
    """Revoke a key by name, and tell the running processes."""
    with (
        closing(build_database(settings, migrate=settings.auto_migrate)) as database,
        database.session_factory() as session,
    ):
        found = crud.get_api_key_by_name(session=session, name=args.name)
        if found is None:
            raise CommandError(f"no key named {args.name!r}")
        crud.revoke_api_key(session=session, api_key=found)
        announce_revocation(
            limiter=build_limiter(settings), cache=None, settings=settings, key_id=found.id
        )
    print(f"revoked {args.name}")


def scopes(value: str) -> list[Scope]:
    """`send,read` as scopes."""
    try:
        return [Scope(s.strip()) for s in value.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


if __name__ == "__main__":
    main()
