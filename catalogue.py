"""Templates as the API and the operators see them: each version checked by the sandbox
(`templating.Renderer.check`) before it is stored, previews, and the shipped catalogue.

The catalogue is the repository's `templates/` folder, reviewed like code: a folder per
template (`templates/booking_confirmed/`) with `template.toml` (category, sensitive, unsubscribe,
default locale, variables) and a file per locale and part: `ru.subject`, `ru.txt`,
`ru.html`, `ru.sms`, `ru.telegram` (each optional). `install` stores a folder as a new
version only when one of its files changed (their SHA-256 is kept on the version), and
makes it active unless an operator has activated a version of their own.
"""

import hashlib
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import crud
from models import Channel, Template, TemplateVersion
from schemas import (
    LocaleContent,
    TemplateCreate,
    TemplatePreview,
    TemplatePreviewRequest,
    TemplateVersionCreate,
    VariableSpec,
)
from templating import LOCALES, Checked, Renderer, TemplateError, Variable, pick_locale, sms_info

logger = logging.getLogger(__name__)

CATALOGUE_DIR = Path(__file__).resolve().parent / "templates"
# A catalogue file's suffix, and the part of a locale it holds.
FILE_PARTS = {
    "subject": "subject",
    "txt": "text",
    "html": "html",
    "sms": "sms",
    "telegram": "telegram",
}


class PreconditionFailed(Exception):
    """If-Match named another row version: someone changed the template meanwhile (412)."""


class VersionTaken(Exception):
    """Another writer stored a version (or a template of the key) first (409)."""


def variables_of(version: TemplateVersion) -> list[Variable]:
    return [Variable(**spec) for spec in version.variables]


@dataclass(frozen=True)
class Catalogue:
    """Checks, stores and previews templates with one renderer (the one sends use)."""

    renderer: Renderer

    def check(self, data: TemplateVersionCreate) -> Checked:
        """`data`'s content as it would be stored; `TemplateError` if any part fails."""
        return self.renderer.check(
            {locale: parts.model_dump() for locale, parts in data.content.items()},
            [Variable(**v.model_dump()) for v in data.variables],
            telegram_html=data.telegram_parse_mode == "HTML",
        )

    def create(
        self,
        session: Session,
        data: TemplateCreate,
        *,
        source: str = "api",
        digest: str | None = None,
    ) -> tuple[Template, TemplateVersion, list[str]]:
        """Store a new template and its first version; `VersionTaken` if the key is taken."""
        checked = self.check(data)
        if crud.get_template(session=session, key=data.key) is not None:
            raise VersionTaken("a template with this key exists")
        try:
            template, version = crud.create_template(
                session=session,
                values={
                    "key": data.key,
                    "category": data.category,
                    "sensitive": data.sensitive,
                    "unsubscribe": data.unsubscribe,
                    "default_locale": data.default_locale,
                    "description": data.description,
                },
                version=_version_values(data, checked, source, digest),
                activate=data.activate,
            )
        except IntegrityError:
            session.rollback()
            raise VersionTaken("a template with this key exists") from None
        return template, version, checked.warnings

    def add_version(
        self,
        session: Session,
        template: Template,
        data: TemplateVersionCreate,
        *,
        source: str = "api",
        digest: str | None = None,
    ) -> tuple[TemplateVersion, list[str]]:
        """Store the template's next version (active if `data.activate`)."""
        checked = self.check(data)
        try:
            version = crud.add_template_version(
                session=session,
                template=template,
                version=_version_values(data, checked, source, digest),
                activate=data.activate,
            )
        except IntegrityError:
            session.rollback()
            raise VersionTaken("another version was added at the same time; try again") from None
        return version, checked.warnings

    def activate(
        self, session: Session, template: Template, number: int, *, if_match: int | None
    ) -> Template:
        """Make version `number` active (the rollback is activating an older one);
        `PreconditionFailed` if the template changed since the ETag `if_match`."""
        if not crud.activate_template_version(
            session=session, template=template, number=number, expected=if_match
        ):
            raise PreconditionFailed("the template changed since it was read; read it again")
        return template

    def preview(
        self, template: Template, version: TemplateVersion, request: TemplatePreviewRequest
    ) -> TemplatePreview:
        """Every channel's output of `version` for `request.data` in its locale, the SMS
        parts and encoding, and warnings (variables given but not declared)."""
        locale = pick_locale(version.content, request.locale, template.default_locale)
        if locale is None or (request.locale and not request.locale.startswith(locale)):
            raise TemplateError(
                f"version {version.number} has no locale {request.locale}", field="locale"
            )
        variables = variables_of(version)
        rendered = self.renderer.render(
            version.content,
            variables,
            request.data,
            locale=locale,
            telegram_html=version.telegram_parse_mode == "HTML",
        )
        declared = {v.name for v in variables}
        unknown = sorted(set(request.data) - declared)
        warnings = [f"not declared, ignored: {', '.join(unknown)}"] if unknown else []
        email = rendered.get(Channel.EMAIL)
        sms = rendered.get(Channel.SMS)
        telegram = rendered.get(Channel.TELEGRAM)
        return TemplatePreview(
            version=version.number,
            locale=locale,
            email=email.stored() if email else None,
            sms={"text": sms.text, **sms_info(sms.text)} if sms else None,
            telegram=telegram.stored() if telegram else None,
            warnings=warnings,
        )

    def install(self, session: Session, directory: Path = CATALOGUE_DIR) -> list[str]:
        """Install the shipped templates: each folder whose files changed becomes a new
        version. What was installed, as "key vN"."""
        installed: list[str] = []
        for folder in sorted(p for p in directory.iterdir() if p.is_dir() and p.name[0] != "_"):
            try:
                done = self._install_one(session, folder)
            except VersionTaken:
                # Another process installing at the same moment stored it first.
                continue
            if done:
                installed.append(done)
        if installed:
            logger.info("templates installed: %s", ", ".join(installed))
        return installed

    def _install_one(self, session: Session, folder: Path) -> str | None:
        data, digest = read_folder(folder)
        template = crud.get_template(session=session, key=data.key)
        if template is None:
            template, version, _ = self.create(session, data, source="catalogue", digest=digest)
            return f"{template.key} v{version.number}"
        shipped = [
            v
            for v in crud.list_template_versions(session=session, template=template)
            if v.source == "catalogue"
        ]
        if shipped and shipped[-1].source_hash == digest:
            return None
        active = next((v for v in shipped if v.number == template.active_version), None)
        # An operator's own active version stays active; the shipped one waits beside it.
        follow = template.active_version is None or active is not None
        template.category = data.category
        template.sensitive = data.sensitive
        template.unsubscribe = data.unsubscribe
        template.description = data.description
        version, _ = self.add_version(
            session,
            template,
            data.model_copy(update={"activate": follow}),
            source="catalogue",
            digest=digest,
        )
        return f"{template.key} v{version.number}"


def _version_values(
    data: TemplateVersionCreate, checked: Checked, source: str, digest: str | None
) -> dict[str, Any]:
    return {
        "variables": [v.model_dump() for v in data.variables],
        "content": checked.content,
        "telegram_parse_mode": data.telegram_parse_mode,
        "source": source,
        "source_hash": digest,
    }


def read_folder(folder: Path) -> tuple[TemplateCreate, str]:
    """A catalogue folder as the template it creates, and the SHA-256 of its files."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    meta = tomllib.loads((folder / "template.toml").read_text("utf-8"))
    content: dict[str, dict[str, str]] = {}
    for path in files:
        locale, _, suffix = path.name.partition(".")
        if locale in LOCALES and suffix in FILE_PARTS:
            content.setdefault(locale, {})[FILE_PARTS[suffix]] = path.read_text("utf-8")
    data = TemplateCreate(
        key=folder.name,
        category=meta.get("category", "transactional"),
        sensitive=meta.get("sensitive", False),
        unsubscribe=meta.get("unsubscribe", False),
        default_locale=meta.get("default_locale", "ru"),
        description=meta.get("description"),
        telegram_parse_mode=meta.get("telegram_parse_mode"),
        variables=[VariableSpec(**v) for v in meta.get("variables", [])],
        content={locale: LocaleContent(**parts) for locale, parts in content.items()},
    )
    return data, digest.hexdigest()
