"""The layout the README describes, checked: imports point down, routes are endpoints only,
the worker builds no attempt, and one function writes a notification's state."""

import ast
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from models import ADDRESS_FIELDS, Recipient, utcnow
from schemas import Contacts, RecipientPublic
from tests.conftest import BOOKING, drain
from tests.smtpd import ScriptedHandler
from worker import Worker

PROJECT = Path(__file__).resolve().parent.parent
# Bottom to top, as in the README's layout section: each module imports only modules
# before it.
ORDER = [
    "models",
    "headers",
    "config",
    "suppression",
    "pages",
    "devmail",
    "devoutbox",
    "serving",
    "db",
    "ratelimits",
    "channels.base",
    "channels.http",
    "channels.sms_ru",
    "channels.telegram",
    "signing",
    "mailer",
    "retries",
    "lifecycle",
    "templating",
    "schemas",
    "strictjson",
    "idempotency",
    "crud",
    "attachments",
    "catalogue",
    "auth",
    "recorder",
    "delivery",
    "deps",
    "wiring",
    "routes",
    "worker",
    "inbound",
    "cli",
    "main",
]


def source(module: str) -> ast.Module:
    return ast.parse((PROJECT / (module.replace(".", "/") + ".py")).read_text())


def imported(module: str) -> set[str]:
    """The project's modules `module` imports."""
    names: set[str] = set()
    for node in ast.walk(source(module)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names & set(ORDER)


def test_every_module_is_placed_in_the_order() -> None:
    modules = {p.stem for p in PROJECT.glob("*.py")} | {
        f"channels.{p.stem}" for p in (PROJECT / "channels").glob("*.py") if p.stem != "__init__"
    }

    assert modules == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_imports_point_down(module: str) -> None:
    above = set(ORDER[ORDER.index(module) :])

    assert imported(module) & above == set()


def calls(module: str, prefix: str) -> set[str]:
    """The names called as `prefix.<name>(...)` in `module`."""
    return {
        node.func.attr
        for node in ast.walk(source(module))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == prefix
    }


def test_routes_are_endpoints_only() -> None:
    tree = source("routes")
    tries = [node for node in ast.walk(tree) if isinstance(node, ast.Try)]
    # One: a duplicate key name is a 409.
    assert [ast.unparse(h.type) for t in tries for h in t.handlers if h.type] == ["IntegrityError"]
    assert all(not t.finalbody for t in tries)
    # crud from routes: reads, and the recipients', templates', keys' and suppressions'
    # own records;
    # nothing of a notification's lifecycle.
    assert calls("routes", "crud") <= {
        "get_batch",
        "count_batch",
        "list_notifications",
        "upsert_recipient",
        "update_recipient",
        "delete_recipient",
        "list_templates",
        "list_template_versions",
        "get_template_version",
        "delete_template",
        "list_api_keys",
        "get_api_key",
        "revoke_api_key",
        "list_suppressions",
        "add_suppressions",
        "find_suppression",
        "get_suppression",
        "delete_suppression",
        "list_reports",
    }


def test_the_worker_builds_no_attempt() -> None:
    names = {n.id for n in ast.walk(source("worker")) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(source("worker")) if isinstance(n, ast.Attribute)}

    assert {"Attempt", "next_state"} & names == set()
    assert {"transmit", "apply_transitions", "send"} & attributes == set()


def test_contact_fields_come_from_one_table() -> None:
    fields = set(ADDRESS_FIELDS.values())

    assert fields <= set(Contacts.model_fields)
    assert fields <= set(RecipientPublic.model_fields)
    assert fields <= set(Recipient.__table__.c.keys())


@pytest.fixture
def status_writers() -> Iterator[list[str]]:
    """The crud function behind every statement that writes notifications.status."""
    writers: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        lowered = " ".join(statement.lower().split())
        if "update notifications" in lowered and "status" in lowered.split(" where ")[0]:
            frames = [f.name for f in traceback.extract_stack() if f.filename.endswith("crud.py")]
            # On SQLite its loop (_apply_one_by_one) makes the statements: the writer is
            # the function of crud's interface that the stack went through.
            public = [name for name in frames if not name.startswith("_")]
            writers.append(public[-1] if public else "?")

    # On the class: every engine, the apps' and the workers' included.
    event.listen(Engine, "before_cursor_execute", seen)
    yield writers
    event.remove(Engine, "before_cursor_execute", seen)


def test_one_function_writes_a_notifications_state(
    status_writers: list[str],
    make_client: Callable[..., TestClient],
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
) -> None:
    """Sent in the request, failed, resent, queued and sent by a worker, cancelled."""
    client = make_client(worker_in_api=False)
    sent = client.post("/notify/email", json=BOOKING)
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")
    failed = client.post("/notify/email", json=BOOKING).json()
    resent = client.post(f"/notifications/{failed['id']}/retry")
    queued = client.post("/notify/email", json=BOOKING, headers={"Prefer": "respond-async"})
    drain(make_worker())
    later = BOOKING | {"send_at": (utcnow() + timedelta(hours=1)).isoformat()}
    scheduled = client.post("/notify/email", json=later)
    cancelled = client.post(f"/notifications/{scheduled.json()['id']}/cancel")

    assert [r.status_code for r in (sent, resent, queued, cancelled)] == [201, 200, 202, 200]
    assert status_writers
    assert set(status_writers) == {"apply_transitions"}
