"""The approvers' page as HTML: every value escaped, no script at all.

Tool arguments come from an agent and may hold markup meant for the
approver's browser, so nothing reaches the page except through ``_text``,
which escapes it. The page needs no JavaScript; its Content-Security-Policy
allows none.
"""

from __future__ import annotations

import datetime
import html
import json
from dataclasses import dataclass

from broker.approvals.model import PendingAction, Status


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who looks at the page, and the session's CSRF token for its forms."""

    name: str
    groups: tuple[str, ...]
    csrf: str


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def layout(title: str, body: str, viewer: Viewer | None, flash: str = "") -> str:
    who = ""
    if viewer is not None:
        groups = f" <span class=muted>({_text(', '.join(viewer.groups))})</span>"
        who = (
            f"<span>Signed in as <strong>{_text(viewer.name)}</strong>"
            f"{groups if viewer.groups else ''}</span>"
            '<form method=post action="/approvals/logout" class=inline>'
            f"{_csrf(viewer)}<button class=link>Sign out</button></form>"
        )
    notice = f"<p class=flash role=status>{_text(flash)}</p>" if flash else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)} · MCP broker</title>"
        '<link rel=stylesheet href="/approvals/page.css"></head><body>'
        '<header><a class=brand href="/approvals/">MCP broker · Approvals</a>'
        f"<nav>{who}</nav></header><main>{notice}{body}</main></body></html>"
    )


def list_body(
    actions: list[PendingAction], viewer: Viewer, now: float, url: str
) -> str:
    if not actions:
        return (
            "<h1>Pending actions</h1><p class=empty>Nothing is waiting for you. "
            "New requests appear here as agents make them.</p>"
        )
    cards = "".join(card(a, viewer, now, f"{url}/actions/{a.id}") for a in actions)
    count = f"{len(actions)} waiting" if len(actions) > 1 else "1 waiting"
    return f"<h1>Pending actions <span class=count>{count}</span></h1>{cards}"


def card(action: PendingAction, viewer: Viewer, now: float, link: str) -> str:
    binding = action.binding
    arguments = json.dumps(action.arguments, indent=2, ensure_ascii=False)
    policies = "".join(f"<li><code>{_text(p)}</code></li>" for p in action.policies)
    return (
        f'<article class=action id="action-{_text(action.id)}">'
        f"<div class=head><h2><code>{_text(binding.tool)}</code></h2>"
        f"{_badge(action, now)}</div>"
        "<dl>"
        f"<dt>Asked by</dt><dd><strong>{_text(binding.subject)}</strong> through "
        f"the agent <code>{_text(binding.client_id)}</code></dd>"
        f"<dt>Server</dt><dd><code>{_text(action.server)}</code></dd>"
        f"<dt>Asked at</dt><dd>{_clock(action.created)}</dd>"
        f"<dt>Expires</dt><dd>{_clock(action.expires)} "
        f"<span class=muted>({_until(action.expires, now)})</span></dd>"
        f"<dt>Held by policy</dt><dd><ul class=policies>{policies}</ul></dd>"
        "</dl>"
        "<h3>Arguments <span class=muted>(secrets redacted)</span></h3>"
        f"<pre class=arguments>{_text(arguments)}</pre>"
        f"<p class=digest>Argument digest <code>{_text(binding.digest)}</code> · "
        f'<a href="{_text(link)}">link to this action</a></p>'
        f"{_outcome(action)}{_form(action, viewer, now)}</article>"
    )


def _badge(action: PendingAction, now: float) -> str:
    if action.status is Status.PENDING and action.expires <= now:
        return "<span class='badge expired'>expired</span>"
    status = action.status.value
    return f"<span class='badge {status}'>{status}</span>"


def _outcome(action: PendingAction) -> str:
    if action.status is Status.PENDING or action.approver is None:
        return ""
    reason = f": “{_text(action.reason)}”" if action.reason else ""
    return (
        f"<p class=outcome>{_OUTCOMES[action.status]} by "
        f"<strong>{_text(action.approver)}</strong>{reason}</p>"
    )


_OUTCOMES = {
    Status.APPROVED: "Approved",
    Status.USED: "Approved, and the call has gone ahead,",
    Status.REJECTED: "Rejected",
    Status.EXPIRED: "Approved, but not used before it expired,",
}


def _form(action: PendingAction, viewer: Viewer, now: float) -> str:
    if action.status is not Status.PENDING or action.expires <= now:
        return ""
    base = f"/approvals/actions/{_text(action.id)}"
    return (
        f'<form method=post action="{base}/approve" class=decide>{_csrf(viewer)}'
        f'<label for="reason-{_text(action.id)}">Reason '
        "<span class=muted>(optional to approve, needed to reject; "
        "the agent sees it)</span></label>"
        f'<textarea id="reason-{_text(action.id)}" name=reason rows=2 '
        "maxlength=1000></textarea><div class=buttons>"
        "<button class=approve>Approve</button>"
        f'<button class=reject formaction="{base}/reject">Reject</button>'
        "</div></form>"
    )


def message_body(heading: str, text: str, link: str = "/approvals/") -> str:
    return (
        f"<h1>{_text(heading)}</h1><p>{_text(text)}</p>"
        f'<p><a href="{_text(link)}">Back to pending actions</a></p>'
    )


def _csrf(viewer: Viewer) -> str:
    return f'<input type=hidden name=csrf value="{_text(viewer.csrf)}">'


def _clock(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"<time>{moment:%Y-%m-%d %H:%M:%S} UTC</time>"


def _until(moment: float, now: float) -> str:
    left = int(moment - now)
    if left <= 0:
        return "expired"
    if left < 120:
        return f"in {left} s"
    return f"in {left // 60} min"


STYLESHEET = """
:root { color-scheme: light; --ink: #1d2433; --muted: #5b6478; --line: #dde2ea;
  --bg: #f5f7fa; --card: #fff; --ok: #146c43; --no: #b02a37; --accent: #2f5bd3; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--ink); background: var(--bg); }
header { display: flex; justify-content: space-between; align-items: center;
  padding: 12px 28px; background: #1d2433; color: #fff; }
header a.brand { color: #fff; font-weight: 600; text-decoration: none; }
header nav { display: flex; gap: 12px; align-items: center; font-size: 14px; }
header .muted { color: #b8c0d0; }
main { max-width: 860px; margin: 28px auto; padding: 0 20px; }
h1 { font-size: 22px; margin: 0 0 18px; }
h1 .count { font-size: 14px; font-weight: 500; color: var(--muted);
  background: var(--line); border-radius: 999px; padding: 2px 10px;
  vertical-align: middle; }
.action { background: var(--card); border: 1px solid var(--line);
  border-radius: 10px; padding: 18px 22px; margin-bottom: 20px;
  box-shadow: 0 1px 2px rgba(29, 36, 51, .06); }
.action .head { display: flex; justify-content: space-between; align-items: center; }
.action h2 { font-size: 18px; margin: 0; }
.action h2 code { font-size: 18px; font-weight: 600; }
.action h3 { font-size: 14px; margin: 14px 0 6px; }
dl { display: grid; grid-template-columns: 130px 1fr; gap: 4px 12px; margin: 12px 0 0; }
dt { color: var(--muted); }
dd { margin: 0; }
ul.policies { margin: 0; padding: 0; list-style: none; }
ul.policies code { background: #eef1f6; border-radius: 4px; padding: 1px 6px; }
code { font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, monospace; }
pre.arguments { background: #f0f3f8; border: 1px solid var(--line);
  border-radius: 6px; padding: 10px 12px; margin: 0; overflow-x: auto;
  white-space: pre-wrap; word-break: break-word; font-size: 13px; }
.digest { color: var(--muted); font-size: 12px; margin: 6px 0 0; }
.digest code { font-size: 12px; }
.badge { font-size: 12px; font-weight: 600; text-transform: uppercase;
  letter-spacing: .04em; border-radius: 999px; padding: 2px 10px; }
.badge.pending { background: #fff3cd; color: #7a5b00; }
.badge.approved, .badge.used { background: #d1f0df; color: var(--ok); }
.badge.rejected, .badge.expired { background: #f8d7da; color: var(--no); }
.muted { color: var(--muted); font-weight: 400; }
form.decide { margin-top: 16px; border-top: 1px solid var(--line); padding-top: 14px; }
form.decide label { display: block; font-size: 14px; margin-bottom: 4px; }
textarea { width: 100%; font: inherit; padding: 8px; border: 1px solid var(--line);
  border-radius: 6px; resize: vertical; }
.buttons { display: flex; gap: 10px; margin-top: 10px; }
button { font: inherit; font-weight: 600; border: 0; border-radius: 6px;
  padding: 8px 18px; cursor: pointer; }
button.approve { background: var(--ok); color: #fff; }
button.reject { background: #fff; color: var(--no); border: 1px solid var(--no); }
button.link { background: none; color: #fff; padding: 0; font-weight: 400;
  text-decoration: underline; }
form.inline { display: inline; }
.flash { background: #e7efff; border: 1px solid #c5d5fb; border-radius: 6px;
  padding: 10px 14px; }
.outcome { margin: 14px 0 0; }
.empty { color: var(--muted); }
"""
