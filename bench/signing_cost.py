"""DKIM signing cost per message: `python bench/signing_cost.py` prints JSON.

A booking e-mail as the worker renders it (MessageRenderer, ~1 KB), then signed as
EmailChannel signs it (dkimpy, rsa-sha256, 2048-bit key, relaxed/relaxed): the process's
CPU time per message (whatever else the shared machine runs), median of 7 repeats, after
a warm-up; with the RSA step by OpenSSL (ours) and by dkimpy's own pure-Python code.
"""

import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402

import signing  # noqa: E402
from mailer import MessageRenderer  # noqa: E402

MESSAGES = 400
TEXT = (
    "Переговорная «Байкал» забронирована на 25 ноября, 10:00–12:00.\n"
    "Адрес: ул. Ленина, 1, 3 этаж. Если планы изменятся, отмените бронь в приложении.\n"
) * 4


def per_message_us(work: Callable[[int], object], count: int) -> float:
    for n in range(min(count, 50)):
        work(n)
    repeats = []
    for _ in range(7):
        started = time.process_time()
        for n in range(count):
            work(n)
        repeats.append((time.process_time() - started) / count * 1e6)
    return round(statistics.median(repeats), 1)


def main() -> None:
    renderer = MessageRenderer("Coworking <noreply@coworking.local>")
    signer = signing.DkimSigner(
        domain="coworking.local", selector="notify", private_key=signing.new_key()
    )
    date = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)

    def render(n: int) -> bytes:
        return renderer.render(
            recipient=f"member{n}@example.com",
            subject="Бронь подтверждена: «Байкал», 25 ноября",
            text=TEXT,
            message_id=f"<bench.{n}@coworking.local>",
            date=date,
        ).data

    def signed(n: int) -> bytes:
        return signer.sign(render(n))

    render_us = per_message_us(render, MESSAGES)
    ours = per_message_us(signed, MESSAGES)
    with mock.patch.object(dkim, "RSASSA_PKCS1_v1_5_sign", signing._pure_python_sign):
        pure = per_message_us(signed, MESSAGES // 4)
    print(
        json.dumps(
            {
                "message_bytes": len(signed(0)),
                "render_us": render_us,
                "ours_us": round(ours - render_us, 1),
                "dkimpy_us": round(pure - render_us, 1),
                "speedup": round((pure - render_us) / (ours - render_us), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
