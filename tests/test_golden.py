"""Golden files of the shipped catalogue: each template rendered with its own examples, in
each locale, as every channel would send it (subject, text, HTML, SMS text and its
segments, Telegram text), compared with tests/golden/<template>/<locale>.<part>.

A change to a template, a layout or the renderer shows up here as a diff to review;
`UPDATE_GOLDEN=1 make test` writes the files anew.
"""

import json
import os
from pathlib import Path

import pytest

from catalogue import CATALOGUE_DIR, read_folder
from config import Settings
from models import Channel
from templating import Renderer, Variable, sms_info

GOLDEN = Path(__file__).parent / "golden"
TEMPLATES = sorted(p.name for p in CATALOGUE_DIR.iterdir() if not p.name.startswith("_"))


def rendered_parts(key: str, locale: str) -> dict[str, str]:
    """Each part of `key` in `locale`, rendered with the template's examples."""
    renderer = Renderer(brand=Settings(_env_file=None).brand())
    data, _ = read_folder(CATALOGUE_DIR / key)
    variables = [Variable(**v.model_dump()) for v in data.variables]
    checked = renderer.check({k: v.model_dump() for k, v in data.content.items()}, variables)
    examples = {v.name: v.example for v in variables}
    channels = renderer.render(checked.content, variables, examples, locale=locale)
    parts: dict[str, str] = {}
    email = channels.get(Channel.EMAIL)
    if email is not None:
        parts["subject"] = f"{email.subject}\n"
        parts["txt"] = email.text
        if email.html is not None:
            parts["html"] = email.html
    sms = channels.get(Channel.SMS)
    if sms is not None:
        parts["sms"] = sms.text
        parts["sms.json"] = json.dumps(sms_info(sms.text), sort_keys=True) + "\n"
    telegram = channels.get(Channel.TELEGRAM)
    if telegram is not None:
        parts["telegram"] = telegram.text
    return parts


@pytest.mark.parametrize("locale", ["ru", "en"])
@pytest.mark.parametrize("key", TEMPLATES)
def test_a_shipped_template_renders_as_its_golden_files(key: str, locale: str) -> None:
    parts = rendered_parts(key, locale)
    folder = GOLDEN / key
    if os.environ.get("UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{locale}.*"):
            stale.unlink()
        for part, text in parts.items():
            (folder / f"{locale}.{part}").write_text(text, encoding="utf-8")

    golden = {p.name.removeprefix(f"{locale}."): p for p in folder.glob(f"{locale}.*")}

    assert set(golden) == set(parts), f"parts of {key}/{locale}"
    for part, text in parts.items():
        assert text == golden[part].read_text(encoding="utf-8"), f"{key}/{locale}.{part}"


def test_every_template_has_golden_files() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir()) == TEMPLATES
