"""Files attached to e-mail: uploaded once (`POST /attachments`, multipart/form-data) or
sent inline (base64, up to `schemas.INLINE_MAX`), their bytes stored once per SHA-256 and
referenced by id from any number of sends.

- Names are sanitised (no path, no control characters, at most 255 characters) and sent
  RFC 2231 encoded when not ASCII (`mailer.build_message`).
- Types: ATTACHMENT_TYPES only (a 415 otherwise).
- Size: an e-mail, its text and HTML and every attachment in base64, weighs at most
  ATTACHMENT_MAX_MESSAGE_BYTES (a 413 otherwise); an upload over it is refused as it
  arrives (main.BodySizeLimit), before anything is stored.
- Expiry: an attachment no notification refers to is deleted ATTACHMENT_RETENTION after
  its upload (the worker's housekeeping, `cli.py attachments expire`), and its bytes with
  it when no other upload shares them.
"""

import hashlib
import math
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

import crud
from channels.base import File
from config import Settings
from lifecycle import Refused
from models import Attachment, Notification, utcnow
from schemas import AttachmentItem, AttachmentRef

MAX_FILENAME = 255
_CHUNK = 64 * 1024
# Blobs kept in memory by a process for the sends that repeat them (a bulk's one PDF).
_CACHE_BYTES = 32 * 1024 * 1024


class AttachmentRefused(ValueError):
    """An attachment the service does not take: `status` is 413 (too big) or 415 (a type
    not allowed). One that does not exist is a `lifecycle.Refused` (422)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def sanitised_filename(name: str | None) -> str:
    """`name` as it may be sent: its last path component, NFC, without control or format
    characters, without leading dots, at most 255 characters (the extension kept)."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if not unicodedata.category(c).startswith("C"))
    name = " ".join(name.split()).lstrip(". ")
    if len(name) > MAX_FILENAME:
        stem, dot, extension = name.rpartition(".")
        if dot and 0 < len(extension) <= 16:
            name = stem[: MAX_FILENAME - len(extension) - 1] + "." + extension
        else:
            name = name[:MAX_FILENAME]
    return name or "attachment"


def encoded_size(size: int) -> int:
    """The bytes of `size` bytes in base64, in lines of 76 characters and CRLF."""
    encoded = 4 * math.ceil(size / 3)
    return encoded + 2 * math.ceil(encoded / 76)


def text_size(text: str | None) -> int:
    """An upper bound of a text part's bytes in quoted-printable (each UTF-8 byte as
    `=XX`, at worst)."""
    return 3 * len(text.encode("utf-8", "surrogatepass")) if text else 0


def described(attachment: Attachment) -> dict[str, Any]:
    """An attachment as a notification stores it (`Notification.attachments`)."""
    return {
        "id": attachment.id,
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "size": attachment.size,
        "sha256": attachment.sha256,
    }


class Attachments:
    """Stores attachments and reads them back for the sends (see the module docstring)."""

    def __init__(self, settings: Settings, *, now: Callable[[], datetime] = utcnow) -> None:
        self.max_message_bytes = settings.attachment_max_message_bytes
        self.types = frozenset(t.lower() for t in settings.attachment_types)
        self.retention = timedelta(seconds=settings.attachment_retention)
        self.now = now
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def content_type(self, value: str | None) -> str:
        """The media type of `value` (its parameters dropped), if ATTACHMENT_TYPES has it."""
        media_type = (value or "application/octet-stream").split(";")[0].strip().lower()
        if media_type not in self.types:
            raise AttachmentRefused(
                f"content type {media_type[:127]!r} is not allowed for attachments "
                "(ATTACHMENT_TYPES)",
                status=415,
            )
        return media_type

    def upload(
        self, *, session: Session, file: BinaryIO, filename: str | None, content_type: str | None
    ) -> Attachment:
        """Store an uploaded file, read in chunks and hashed on the way."""
        media_type = self.content_type(content_type)
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        size = 0
        while chunk := file.read(_CHUNK):
            size += len(chunk)
            if encoded_size(size) > self.max_message_bytes:
                raise self._too_big()
            digest.update(chunk)
            chunks.append(chunk)
        return self._stored(session, b"".join(chunks), digest.hexdigest(), filename, media_type)

    def resolve(
        self, *, session: Session, items: Sequence[AttachmentItem], parts: Sequence[str]
    ) -> list[Attachment]:
        """The attachments a send names, in order, for an e-mail of `parts` (its subject
        and bodies): stored ones by id (a 422 if one is missing), inline ones stored, once
        the e-mail is known to weigh no more than ATTACHMENT_MAX_MESSAGE_BYTES (a 413)."""
        ids = [item.id for item in items if isinstance(item, AttachmentRef)]
        found = crud.get_attachments(session=session, ids=ids) if ids else {}
        sizes = [text_size(part) for part in parts]
        # Each inline item's media type, by its position.
        types: dict[int, str] = {}
        for index, item in enumerate(items):
            if isinstance(item, AttachmentRef):
                if item.id not in found:
                    raise Refused(f"no attachment {item.id}", field=f"attachments.{index}")
                sizes.append(encoded_size(found[item.id].size))
            else:
                types[index] = self.content_type(item.content_type)
                sizes.append(encoded_size(len(item.content)))
        if sum(sizes) > self.max_message_bytes:
            raise self._too_big()
        return [
            found[item.id]
            if isinstance(item, AttachmentRef)
            else self._stored(
                session,
                item.content,
                hashlib.sha256(item.content).hexdigest(),
                item.filename,
                types[index],
            )
            for index, item in enumerate(items)
        ]

    def files(self, *, session: Session, notification: Notification) -> tuple[File, ...]:
        """The files of a notification's attachments, in order, to send."""
        described = notification.attachments or []
        wanted = {d["sha256"] for d in described}
        with self._lock:
            data = {sha: self._cache[sha] for sha in wanted if sha in self._cache}
            for sha in data:
                self._cache.move_to_end(sha)
        missing = wanted - data.keys()
        if missing:
            loaded = crud.attachment_data(session=session, sha256s=sorted(missing))
            data.update(loaded)
            self._remember(loaded)
        return tuple(
            File(d["filename"], d["content_type"], data[d["sha256"]])
            for d in described
            if d["sha256"] in data
        )

    def expire(self, *, session: Session) -> int:
        """Delete what expired (see the module docstring); how many attachments went."""
        return crud.expire_attachments(session=session, before=self.now() - self.retention)

    def _stored(
        self, session: Session, data: bytes, sha256: str, filename: str | None, media_type: str
    ) -> Attachment:
        return crud.store_attachment(
            session=session,
            sha256=sha256,
            data=data,
            filename=sanitised_filename(filename),
            content_type=media_type,
            now=self.now,
        )

    def _remember(self, loaded: dict[str, bytes]) -> None:
        with self._lock:
            for sha, data in loaded.items():
                if sha in self._cache or len(data) > _CACHE_BYTES // 4:
                    continue
                self._cache[sha] = data
                self._cached += len(data)
            while self._cached > _CACHE_BYTES:
                _, dropped = self._cache.popitem(last=False)
                self._cached -= len(dropped)

    def _too_big(self) -> AttachmentRefused:
        return AttachmentRefused(
            f"the e-mail would be larger than {self.max_message_bytes} bytes once encoded "
            "(ATTACHMENT_MAX_MESSAGE_BYTES)",
            status=413,
        )
