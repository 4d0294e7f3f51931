"""The OpenAPI 3.1 description of the approvers' API."""

from __future__ import annotations

from typing import Any

_ACTION: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "status",
        "decision_id",
        "requester",
        "server",
        "tool",
        "arguments",
        "digest",
        "policies",
        "created",
        "expires",
        "url",
    ],
    "properties": {
        "id": {"type": "string"},
        "status": {
            "type": "string",
            "enum": ["pending", "approved", "rejected", "used", "expired"],
        },
        "decision_id": {
            "type": "string",
            "description": "The decision id of the call that asked for approval.",
        },
        "requester": {
            "type": "object",
            "properties": {
                "subject": {"type": "string"},
                "issuer": {"type": "string"},
                "client": {"type": "string"},
            },
        },
        "server": {"type": "string"},
        "tool": {"type": "string", "description": "Qualified: <server>.<tool>."},
        "arguments": {"description": "The call's arguments, secrets redacted."},
        "digest": {
            "type": "string",
            "description": "SHA-256 of the canonical JSON of the raw arguments.",
        },
        "policies": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The policies that asked for approval.",
        },
        "created": {"type": "string", "format": "date-time"},
        "expires": {"type": "string", "format": "date-time"},
        "approver": {"type": ["string", "null"]},
        "reason": {"type": "string"},
        "decided": {"type": ["string", "null"], "format": "date-time"},
        "url": {"type": "string", "description": "The action on the approvers' page."},
    },
}

_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _answer(description: str, schema: str = "Action") -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {
        "description": description,
        "content": {"application/json": {"schema": ref}},
    }


def _errors(*codes: str) -> dict[str, Any]:
    meaning = {
        "400": "The body is not valid, or a rejection has no reason.",
        "401": "No valid bearer token.",
        "403": "The token lacks approvals:decide, or policy does not allow it.",
        "404": "No such action, or not one this approver may see.",
        "409": "The action was already decided, used or has expired.",
    }
    return {code: _answer(meaning[code], "Error") for code in codes}


def _decision(verdict: str, reason_required: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "object",
        "properties": {"reason": {"type": "string", "maxLength": 1000}},
    }
    if reason_required:
        body["required"] = ["reason"]
    return {
        "summary": f"{verdict.capitalize()} a pending action",
        "operationId": f"{verdict}Action",
        "parameters": [{"$ref": "#/components/parameters/ActionId"}],
        "requestBody": {
            "required": reason_required,
            "content": {"application/json": {"schema": body}},
        },
        "responses": {
            "200": _answer(f"The action, now {verdict}d."),
            **_errors("400", "401", "403", "404", "409"),
        },
    }


def document(public_url: str) -> dict[str, Any]:
    """The document, with ``public_url`` as the server."""
    listed = {
        "type": "object",
        "properties": {
            "actions": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Action"},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MCP broker approvals",
            "version": "1",
            "description": (
                "Tool calls held for a human approver. Every operation needs a "
                "bearer token for this broker with the scope approvals:decide; "
                "policy decides which actions an approver may see and decide."
            ),
        },
        "servers": [{"url": f"{public_url}/approvals/api"}],
        "security": [{"bearer": []}],
        "paths": {
            "/actions": {
                "get": {
                    "summary": "Pending actions this approver may decide on",
                    "operationId": "listActions",
                    "responses": {
                        "200": {
                            "description": "Oldest first.",
                            "content": {"application/json": {"schema": listed}},
                        },
                        **_errors("401", "403"),
                    },
                }
            },
            "/actions/{id}": {
                "get": {
                    "summary": "One action, in any state",
                    "operationId": "showAction",
                    "parameters": [{"$ref": "#/components/parameters/ActionId"}],
                    "responses": {
                        "200": _answer("The action."),
                        **_errors("401", "403", "404"),
                    },
                }
            },
            "/actions/{id}/approve": {"post": _decision("approve", False)},
            "/actions/{id}/reject": {"post": _decision("reject", True)},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "parameters": {
                "ActionId": {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "schemas": {"Action": _ACTION, "Error": _ERROR},
        },
    }
