"""HTTP conventions: HEAD on health, 404 for unknown paths, documentation that works
offline, and access logs without the addresses in query strings."""

import logging
import re

import httpx
import pytest
from fastapi.testclient import TestClient

from config import Settings
from main import create_app
from tests.conftest import AUTH
from tests.faults import LiveServer


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_answers_head(client: TestClient, path: str) -> None:
    response = client.head(path, headers={"Authorization": ""})

    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.parametrize("path", ["/", "/metrics", "/favicon.ico", "/notify/fax"])
def test_an_unknown_path_is_a_404_pointing_to_the_docs_with_or_without_a_key(
    client: TestClient, path: str
) -> None:
    anonymous = client.get(path, headers={"Authorization": ""})
    with_key = client.get(path)

    for response in (anonymous, with_key):
        assert response.status_code == 404
        assert response.json()["docs"] == "/docs"


def test_a_known_protected_path_without_a_key_is_still_a_401(client: TestClient) -> None:
    assert client.get("/notifications/1", headers={"Authorization": ""}).status_code == 401
    assert client.delete("/notifications", headers={"Authorization": ""}).status_code == 401


def test_the_documentation_loads_nothing_from_the_internet(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page, headers={"Authorization": ""})
        assert html.status_code == 200
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset}"
            loaded = client.get(asset, headers={"Authorization": ""})
            assert loaded.status_code == 200, asset
            assert len(loaded.content) > 100


def test_access_logs_leave_out_query_strings(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    app = create_app(settings.model_copy(update={"worker_in_api": False}))

    with LiveServer(app) as server:
        response = httpx.get(
            f"{server.url}/notifications",
            params={"recipient": "ivan.petrov@example.com"},
            headers=AUTH,
        )

    assert response.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any("GET /notifications " in line for line in lines), lines
    assert not any("ivan.petrov" in line or "?" in line for line in lines), lines
