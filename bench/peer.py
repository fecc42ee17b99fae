"""django-post_office, the established Django e-mail queue, as a peer for W3 and W4.

run_post_office() queues `count` e-mails with post_office.mail.send_many (timed: W4's "time to
have them stored"), then delivers them with `manage.py send_queued_mail --processes N` into the
given SMTP server (timed from the start of the command to its end, when the queue is empty), and
counts in the database what was sent. The messages are the service's: the same From, subject
and text, one recipient each (member<i>@example.com), and as many bytes: Django sends the UTF-8
body as 8bit where the service sends quoted-printable, so a Cyrillic postscript lengthens the
text to the service's message size (bench_tasks.pad_text).

The peer runs in its own venv, bench/.peer-venv, made from bench/requirements-peer.txt when it is
missing or the requirements changed; the Django project is bench/post_office_peer/ (its settings
say which POST_OFFICE settings are used, and why). Each run makes its own database on the
server of `admin_url` and drops it at the end. This file needs only the standard library.

Standalone, with smtp-sink listening on PORT:

    python3 bench/peer.py --port PORT --count 10000
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
PEER_PROJECT = BENCH / "post_office_peer"
VENV = BENCH / ".peer-venv"
REQUIREMENTS = BENCH / "requirements-peer.txt"
STAMP = VENV / "requirements.sha256"  # written last: a venv without it is rebuilt

# The service's message in bench/run.py (BODY, EMAIL_FROM); MESSAGE_BYTES is what
# run.py's message_size() gives for it.
SENDER = "Coworking <noreply@coworking.local>"
SUBJECT = "Бронирование подтверждено: переговорная «Байкал»"
TEXT = "Здравствуйте, Иван!\n\nПереговорная «Байкал» забронирована на 25 ноября, 10:00–12:00.\n"
RECIPIENT_DOMAIN = "example.com"
MESSAGE_BYTES = 846

DELIVERY_TIMEOUT = 3600.0  # seconds; 50,000 messages take minutes


def ensure_venv(venv: Path = VENV, requirements: Path = REQUIREMENTS) -> tuple[Path, float]:
    """The python of `venv` holding `requirements` (the peer's, by default), made when it
    is missing or its requirements changed, and the seconds spent making it (0 when reused)."""
    python = venv / "bin" / "python"
    stamp = venv / STAMP.name  # written last: a venv without it is made again
    wanted = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python, 0.0
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    for args in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + ["--no-input", "--requirement", str(requirements)],
    ):
        run = subprocess.run(args, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{run.stdout}{run.stderr}")
    stamp.write_text(wanted + "\n")
    return python, time.monotonic() - started


def peer_env(database_url: str, smtp_host: str, smtp_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return env | {
        "DJANGO_SETTINGS_MODULE": "settings",
        "DATABASE_URL": database_url,
        "SMTP_HOST": smtp_host,
        "SMTP_PORT": str(smtp_port),
        "PYTHONUNBUFFERED": "1",
    }


def task(python: Path, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One subcommand of bench_tasks.py in the peer venv; the JSON it prints."""
    run = subprocess.run(
        [str(python), "bench_tasks.py", *args],
        cwd=PEER_PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(f"bench_tasks.py {args[0]} failed:\n{run.stdout}{run.stderr}")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def timed_command(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `args` in the peer project to its end: its seconds, and the peak RSS in MB of it
    and the children it waited for (send_queued_mail's forked workers): wait4's ru_maxrss."""
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            args, cwd=PEER_PROJECT, env=env, stdout=out, stderr=out, start_new_session=True
        )
        deadline = started + DELIVERY_TIMEOUT
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
                process.returncode = -signal.SIGKILL
                raise RuntimeError(f"{' '.join(args)}: still running after {DELIVERY_TIMEOUT} s")
            time.sleep(0.02)
        seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {process.returncode}: see {log}")
    return seconds, usage.ru_maxrss / 1024


def run_post_office(
    *,
    admin_url: str,
    smtp_host: str,
    smtp_port: int,
    count: int,
    workdir: Path,
    processes: int = 2,
    subject: str = SUBJECT,
    text: str = TEXT,
    message_bytes: int = MESSAGE_BYTES,
) -> dict[str, Any]:
    """Queue `count` e-mails with send_many, deliver them with send_queued_mail.

    Returns enqueue_s (the send_many call), deliver_s (send_queued_mail, start to end),
    msg_per_s (sent / deliver_s), sent and failed (counted in the database afterwards),
    message_bytes (of the message sent), peak_rss_mb (send_queued_mail and its workers),
    enqueue_peak_rss_mb, venv_s (0 when the venv was reused), versions and settings. Raises
    RuntimeError if a step fails or e-mails are left unsent and not failed either.
    """
    python, venv_seconds = ensure_venv()
    workdir.mkdir(parents=True, exist_ok=True)
    database = f"post_office_bench_{int(time.time())}_{os.getpid()}"
    database_url = urlsplit(admin_url)._replace(path=f"/{database}").geturl()
    env = peer_env(database_url, smtp_host, smtp_port)
    task(python, ["createdb", admin_url, database], env)
    try:
        migrate = subprocess.run(
            [str(python), "manage.py", "migrate", "--no-input", "-v", "0"],
            cwd=PEER_PROJECT,
            env=env,
            capture_output=True,
            text=True,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrate.stdout}{migrate.stderr}")
        queued = task(
            python,
            [
                "enqueue",
                f"--count={count}",
                f"--sender={SENDER}",
                f"--subject={subject}",
                f"--text={text}",
                f"--domain={RECIPIENT_DOMAIN}",
                f"--message-bytes={message_bytes}",
            ],
            env,
        )
        deliver_seconds, deliver_rss = timed_command(
            [
                str(python),
                "manage.py",
                "send_queued_mail",
                f"--processes={processes}",
                f"--lockfile={workdir / 'post_office'}",  # its own lock: no other run's
            ],
            env,
            workdir / "post_office-send_queued_mail.log",
        )
        counts = task(python, ["status"], env)["emails"]
    finally:
        task(python, ["dropdb", admin_url, database], env)
    sent, failed = counts.get("sent", 0), counts.get("failed", 0)
    if sent + failed != count:
        raise RuntimeError(f"send_queued_mail left e-mails behind: {counts} of {count}")
    return {
        "messages": count,
        "processes": processes,
        "enqueue_s": round(queued["enqueue_s"], 3),
        "deliver_s": round(deliver_seconds, 2),
        "msg_per_s": round(sent / deliver_seconds, 1),
        "sent": sent,
        "failed": failed,
        "message_bytes": queued["message_bytes"],
        "peak_rss_mb": round(deliver_rss, 1),
        "enqueue_peak_rss_mb": round(queued["peak_rss_mb"], 1),
        "venv_s": round(venv_seconds, 1),
        "versions": queued["versions"],
        "settings": queued["post_office_settings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True, help="the SMTP sink's port")
    parser.add_argument("--host", default="127.0.0.1", help="the SMTP sink's host")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a database on the server where the run makes its own",
    )
    parser.add_argument("--workdir", type=Path, help="for the logs (default: a new temporary one)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="post-office-peer-"))
    result = run_post_office(
        admin_url=args.admin_url,
        smtp_host=args.host,
        smtp_port=args.port,
        count=args.count,
        workdir=workdir,
        processes=args.processes,
    )
    print(json.dumps(result | {"workdir": str(workdir)}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
