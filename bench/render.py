"""A warm templated render per message: `python bench/render.py` prints JSON.

The shipped `booking_confirmed` (ru) rendered as a bulk renders it, for e-mail only (its
subject, HTML and text twin) and for SMS only, with per-recipient data that repeats no
name; the process's CPU time per render (what a render costs, whatever else the shared
machine runs meanwhile), median of 7 repeats of 2,000 renders each, after a warm-up.
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from catalogue import CATALOGUE_DIR, read_folder  # noqa: E402
from config import Settings  # noqa: E402
from models import Channel  # noqa: E402
from templating import Renderer, Variable  # noqa: E402

RENDERS = 2_000


def per_message_us(channels: list[Channel]) -> float:
    renderer = Renderer(brand=Settings(_env_file=None).brand())
    data, _ = read_folder(CATALOGUE_DIR / "booking_confirmed")
    variables = [Variable(**v.model_dump()) for v in data.variables]
    content = renderer.check(
        {k: v.model_dump() for k, v in data.content.items()}, variables
    ).content
    shared = {v.name: v.example for v in variables}
    items = [shared | {"name": f"Участник {i}", "seats": i % 12 + 1} for i in range(RENDERS)]
    for values in items[:200]:
        renderer.render(content, variables, values, locale="ru", channels=channels)
    repeats = []
    for _ in range(7):
        started = time.process_time()
        for values in items:
            renderer.render(content, variables, values, locale="ru", channels=channels)
        repeats.append((time.process_time() - started) / RENDERS * 1e6)
    return round(statistics.median(repeats), 1)


if __name__ == "__main__":
    print(
        json.dumps(
            {
                "email_us": per_message_us([Channel.EMAIL]),
                "sms_us": per_message_us([Channel.SMS]),
            }
        )
    )
