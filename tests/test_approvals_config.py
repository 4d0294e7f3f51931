"""The [approvals] table: its defaults and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import config_from_dict
from broker.errors import ConfigError
from broker.server import build_broker
from tests.harness import REPO

RESOURCE = "https://broker.example.com/mcp"


def approvals(**table: Any) -> Any:
    raw = {"broker": {"resource": RESOURCE, "development": True}, "approvals": table}
    return config_from_dict(raw).approvals


def test_links_default_to_the_origin_of_the_resource() -> None:
    """Without public_url, links point at the resource's scheme and host."""
    assert approvals().public_url == "https://broker.example.com"


def test_a_trailing_slash_is_dropped_from_the_public_url() -> None:
    """A public URL given with a trailing slash makes the same links."""
    assert (
        approvals(public_url="https://ops.example/").public_url == "https://ops.example"
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"wait_seconds": -1}, "wait_seconds"),
        ({"wait_seconds": True}, "wait_seconds"),
        ({"expiry_seconds": 10, "wait_seconds": 30}, "expiry_seconds must exceed"),
        ({"webhook_url": "ftp://chat.example"}, "webhook_url"),
        ({"oidc_issuer": "https://login.example"}, "oidc_client_id"),
        ({"auto_approve": True}, "unknown key"),
    ],
)
def test_unusable_settings_stop_the_start(table: dict[str, Any], message: str) -> None:
    """Each bad setting is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=message):
        approvals(**table)


def test_the_page_needs_its_origin_among_the_allowed(tmp_path: Path) -> None:
    """A page whose forms the Origin check would refuse stops the start."""
    raw = {
        "broker": {
            "resource": RESOURCE,
            "development": True,
            "allowed_origins": ["https://agents.example.com"],
            "policy_dir": str(REPO / "cedar_policies"),
            "manifest_dir": str(REPO / "tool_manifests"),
        },
        "store": {"path": "state.db"},
        "approvals": {"oidc_issuer": "https://login.example", "oidc_client_id": "x"},
    }
    config = config_from_dict(raw, base=tmp_path)
    with pytest.raises(ConfigError, match=r"allowed_origins must list https://broker"):
        build_broker(config)
