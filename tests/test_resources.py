"""Which server owns a resource URI, and who follows its updates."""

from __future__ import annotations

from typing import Any

from broker.resources import Subscriptions, Templates


def test_a_template_belongs_to_the_first_server_that_listed_it() -> None:
    templates = Templates()
    assert templates.add("notes://{title}", "demo")
    assert not templates.add("notes://{title}", "other")
    assert templates.add("files://{path}", "other")
    assert templates.owner("notes://shopping") == "demo"
    assert templates.owner("files://a.txt") == "other"
    assert templates.owner("mail://inbox") is None
    assert templates.owner_of_template("files://{path}") == "other"


def test_a_bad_template_is_not_kept() -> None:
    templates = Templates()
    assert not templates.add("notes://{unclosed", "demo")
    assert templates.owner("notes://x") is None


class Session:
    """Stands in for an agent's session: records updates, or has ended."""

    def __init__(self, ended: bool = False) -> None:
        self.ended = ended
        self.updates: list[str] = []

    async def send_resource_updated(self, uri: str) -> None:
        if self.ended:
            raise ConnectionError("session ended")
        self.updates.append(uri)


async def test_updates_reach_followers_and_ended_sessions_are_dropped() -> None:
    follows = Subscriptions()
    live, ended = Session(), Session(ended=True)
    anyone: Any = live
    assert follows.add("notes://a", "s1", anyone)
    anyone = ended
    assert not follows.add("notes://a", "s2", anyone)
    assert await follows.announce("notes://a") == []
    assert live.updates == ["notes://a"]
    assert len(follows) == 1
    assert follows.remove("notes://a", "s1")  # the last one: unsubscribe


async def test_the_last_follower_dropped_asks_for_an_unsubscribe() -> None:
    follows = Subscriptions()
    gone: Any = Session(ended=True)
    follows.add("notes://b", "s1", gone)
    assert await follows.announce("notes://b") == ["notes://b"]
    assert len(follows) == 0
