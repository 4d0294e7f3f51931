"""Detectors of sensitive data: what they find, what they leave, how they redact."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from broker.classify import CLASSES, MAX_DEPTH, MAX_KEPT_CHARS, inspect, redact_text

# Token-shaped test values are assembled at run time, so that no secret
# scanner mistakes this file for a leak.
AWS_KEY_ID = "AKIA" + "Z7Q2" * 4
AWS_SECRET = "wJalr" + "X9tnF/K7MDENG+bPxRfi" + "CYz8k3LmQ2vTn4pW"
GITHUB_TOKEN = "gh" + "p_" + "A1b2C3d4" * 4 + "E5f6"
GITHUB_PAT = "github" + "_pat_" + "11AB" * 8
SLACK_TOKEN = "xox" + "b-" + "1234567890-" + "AbCdEfGhIjKl"
GOOGLE_KEY = "AI" + "za" + "Sy" + "B3" * 16 + "x"
VISA = "4111 1111 1111 1111"


def _b64(part: dict[str, object]) -> str:
    raw = json.dumps(part).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


JWT = ".".join([_b64({"alg": "RS256"}), _b64({"sub": "alice"}), "c2lnbmF0dXJl"])
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
    "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==\n"
    "-----END RSA PRIVATE KEY-----"
)


def test_email_is_found_and_the_text_around_it_kept() -> None:
    """An email address is replaced by its mark; the sentence stays."""
    found = inspect("write to alice@example.com today")

    assert found.classes == {"email"}
    assert found.redacted == "write to [REDACTED:email] today"


def test_jwt_is_found() -> None:
    """Three base64url segments starting eyJ are a JWT."""
    found = inspect(f"token was {JWT} yesterday")

    assert found.classes == {"jwt"}
    assert found.redacted == "token was [REDACTED:jwt] yesterday"


def test_bearer_token_is_redacted_and_the_scheme_kept() -> None:
    """In "Bearer <token>" only the token goes."""
    found = inspect("send Bearer 9f8e7d6c5b4a3f2e1d0c")

    assert found.classes == {"bearer_token"}
    assert found.redacted == "send Bearer [REDACTED:bearer_token]"


def test_bearer_jwt_counts_as_both() -> None:
    """A JWT presented as a bearer token is reported under both classes."""
    assert inspect(f"Bearer {JWT}").classes == {"bearer_token", "jwt"}


def test_the_word_bearer_in_prose_is_not_a_token() -> None:
    """ "Bearer" followed by an ordinary word is left alone."""
    found = inspect("Bearer instruments were common once")

    assert found.classes == frozenset()
    assert found.redacted == "Bearer instruments were common once"


def test_private_key_block_is_redacted_whole() -> None:
    """A PEM private key goes from BEGIN to END; the text around it stays."""
    found = inspect(f"key:\n{PEM}\nthanks")

    assert found.classes == {"private_key"}
    assert found.redacted == "key:\n[REDACTED:private_key]\nthanks"


def test_private_key_without_end_line_is_still_redacted() -> None:
    """A truncated PEM block is redacted up to where its body stops."""
    found = inspect(PEM.split("-----END")[0])

    assert found.classes == {"private_key"}
    assert found.redacted == "[REDACTED:private_key]"


@pytest.mark.parametrize(
    "key",
    [AWS_KEY_ID, GITHUB_TOKEN, GITHUB_PAT, SLACK_TOKEN, GOOGLE_KEY],
    ids=["aws-key-id", "github", "github-pat", "slack", "google-api"],
)
def test_cloud_keys_are_found(key: str) -> None:
    """Each provider's key format is a cloud_key, wherever it sits in text."""
    found = inspect(f"use {key} here")

    assert found.classes == {"cloud_key"}
    assert found.redacted == "use [REDACTED:cloud_key] here"


def test_aws_secret_is_found_next_to_its_name() -> None:
    """An AWS secret key is recognised by the name before it; the name stays."""
    found = inspect(f"aws_secret_access_key = {AWS_SECRET}")

    assert found.classes == {"cloud_key"}
    assert found.redacted == "aws_secret_access_key = [REDACTED:cloud_key]"


def test_aws_secret_under_its_dict_key_is_a_cloud_key() -> None:
    """The value of an aws_secret_access_key entry is a cloud_key, not a secret."""
    found = inspect({"AWS_SECRET_ACCESS_KEY": AWS_SECRET})

    assert found.classes == {"cloud_key"}
    assert found.redacted == {"AWS_SECRET_ACCESS_KEY": "[REDACTED:cloud_key]"}


def test_gcp_service_account_key_is_a_cloud_key() -> None:
    """A service-account JSON's private key and key id are cloud keys."""
    account = {
        "type": "service_account",
        "private_key_id": "0f" * 20,
        "private_key": PEM + "\n",
        "project_id": "demo",
    }

    found = inspect(account)

    assert found.classes == {"cloud_key", "private_key"}
    assert found.redacted == {
        "type": "service_account",
        "private_key_id": "[REDACTED:cloud_key]",
        "private_key": "[REDACTED:cloud_key]",
        "project_id": "demo",
    }


def test_gcp_service_account_as_text_is_a_cloud_key() -> None:
    """The same JSON, passed as one string, is caught by its key id."""
    text = json.dumps({"type": "service_account", "private_key_id": "ab" * 20})

    assert "cloud_key" in inspect(text).classes


@pytest.mark.parametrize(
    "text", [VISA, "4111-1111-1111-1111", "4111111111111111", "3782 822463 10005"]
)
def test_card_numbers_are_found_with_or_without_separators(text: str) -> None:
    """Digits in the printed groupings that pass Luhn are a card_number."""
    found = inspect(f"card {text}, exp 12/29")

    assert found.classes == {"card_number"}
    assert found.redacted == "card [REDACTED:card_number], exp 12/29"


def test_card_number_given_as_an_int_is_found() -> None:
    """A JSON number is checked like text and replaced by the mark."""
    found = inspect({"pan": 4111111111111111, "qty": 2})

    assert found.classes == {"card_number"}
    assert found.redacted == {"pan": "[REDACTED:card_number]", "qty": 2}


def test_card_after_another_number_is_found() -> None:
    """A quantity written just before a card does not hide it."""
    assert inspect(f"3 {VISA}").redacted == "3 [REDACTED:card_number]"


def test_two_cards_in_one_run_are_both_redacted() -> None:
    """Every card in a run of digit groups goes, not only the first."""
    found = inspect(f"{VISA} 5555 5555 5555 4444")

    assert found.redacted == "[REDACTED:card_number] [REDACTED:card_number]"


@pytest.mark.parametrize(
    "text",
    [
        "order 4111111111111112 shipped",
        "order 4111 1111 1111 1112 shipped",
        "created at 1700000000004",
        "id 550e8400-e29b-41d4-a716-446655440000",
        "id 12345678-1234-1234-1234-123456789012",
        "ratio 0.4111111111111111",
        "call 555 123 4567",
    ],
    ids=[
        "luhn-fails",
        "luhn-fails-grouped",
        "epoch-ms",
        "uuid",
        "digit-uuid",
        "fraction",
        "phone",
    ],
)
def test_numbers_that_are_not_cards_are_left_alone(text: str) -> None:
    """Order numbers failing Luhn, timestamps, UUIDs and fractions are kept."""
    found = inspect(text)

    assert found.classes == frozenset()
    assert found.redacted == text


@pytest.mark.parametrize(
    "text",
    [
        "Each token costs a tenth of a cent",
        "SELECT name FROM users WHERE id = 42",
        "/home/alice/project/README.md",
        "the secret of a good sauce is patience",
        "max_tokens=100",
        "https://example.com/a?page=2",
        "",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    """Prose, paths, queries and URLs carry no class and are kept verbatim."""
    found = inspect(text)

    assert found.classes == frozenset()
    assert found.redacted == text


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "DB_PASSWORD",
        "passwd",
        "client_secret",
        "clientSecret",
        "access-token",
        "api_key",
        "X-Api-Key",
        "apikey",
        "accessKey",
        "private_key",
        "Authorization",
    ],
)
def test_value_under_a_credential_key_is_a_secret(key: str) -> None:
    """Whatever a credential-named key holds is redacted whole as a secret."""
    found = inspect({key: "hunter2", "user": "alice"})

    assert found.classes == {"secret"}
    assert found.redacted == {key: "[REDACTED:secret]", "user": "alice"}


@pytest.mark.parametrize(
    "key", ["max_tokens", "token_count", "pageToken", "next_token", "secret_name"]
)
def test_keys_that_only_look_like_credentials_are_not(key: str) -> None:
    """Counters, paging cursors and names of secrets are ordinary values."""
    found = inspect({key: "abc123"})

    assert found.classes == frozenset()
    assert found.redacted == {key: "abc123"}


@pytest.mark.parametrize("value", [None, ""])
def test_empty_credential_is_not_a_secret(value: object) -> None:
    """A password field left empty holds nothing to protect."""
    found = inspect({"password": value})

    assert found.classes == frozenset()
    assert found.redacted == {"password": value}


def test_credential_value_is_still_classified() -> None:
    """A JWT under a token key counts as jwt too, for the policy to see."""
    found = inspect({"refresh_token": JWT})

    assert found.classes == {"secret", "jwt"}
    assert found.redacted == {"refresh_token": "[REDACTED:secret]"}


def test_credential_assignment_in_text_is_redacted() -> None:
    """ "password=..." inside a string loses its value but keeps its name."""
    found = inspect("mysql --user=app --password=s3cr3t! -h db")

    assert found.classes == {"secret"}
    assert found.redacted == "mysql --user=app --password=[REDACTED:secret] -h db"


def test_authorization_header_in_text_is_redacted() -> None:
    """An Authorization header loses its scheme and credential together."""
    found = inspect("Authorization: Basic YWxpY2U6czNjcjN0")

    assert found.redacted == "Authorization: [REDACTED:secret]"


def test_nested_structures_are_walked() -> None:
    """Dicts in lists in dicts are searched, and their shape is kept."""
    arguments = {
        "to": ["alice@example.com", {"cc": "bob@example.org"}],
        "meta": {"payment": {"card": VISA, "amount": 12.5}, "urgent": True},
    }

    found = inspect(arguments)

    assert found.classes == {"email", "card_number"}
    assert found.redacted == {
        "to": ["[REDACTED:email]", {"cc": "[REDACTED:email]"}],
        "meta": {
            "payment": {"card": "[REDACTED:card_number]", "amount": 12.5},
            "urgent": True,
        },
    }


def test_the_arguments_are_not_modified() -> None:
    """The redacted value is a copy; what the agent sent is untouched."""
    arguments = {"password": "x", "to": ["alice@example.com"]}
    before = copy.deepcopy(arguments)

    inspect(arguments)

    assert arguments == before


def test_secret_in_a_dict_key_is_redacted() -> None:
    """Keys are searched too, and two redacted keys do not collide."""
    found = inspect({"alice@example.com": 1, "bob@example.com": 2})

    assert found.classes == {"email"}
    assert found.redacted == {"[REDACTED:email]": 1, "[REDACTED:email]#2": 2}


def test_values_nested_too_deep_are_replaced() -> None:
    """Below MAX_DEPTH a value is not searched but replaced, and flagged."""
    deep: object = "alice@example.com"
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]

    found = inspect(deep)

    assert found.classes == {"too_deep"}
    assert "[REDACTED:too_deep]" in json.dumps(found.redacted)
    assert "alice" not in json.dumps(found.redacted)


def test_values_at_the_depth_limit_are_still_searched() -> None:
    """Nesting up to MAX_DEPTH is walked as usual."""
    deep: object = "alice@example.com"
    for _ in range(MAX_DEPTH):
        deep = [deep]

    assert inspect(deep).classes == {"email"}


def test_a_long_string_is_searched_in_full_but_not_kept() -> None:
    """Padding does not hide a key; the record keeps a mark, not a megabyte."""
    text = "x" * MAX_KEPT_CHARS + f" {AWS_KEY_ID}"

    found = inspect({"blob": text})

    assert found.classes == {"cloud_key", "too_large"}
    assert found.redacted == {"blob": "[REDACTED:too_large]"}


def test_other_scalars_pass_through() -> None:
    """Booleans, None, floats and small ints are copied as they are."""
    value = {"a": True, "b": None, "c": 1.5, "d": 7, "e": [False]}

    assert inspect(value).redacted == value


def test_redact_text_applies_the_same_detectors() -> None:
    """A log line loses the same things arguments do."""
    line = f"user=alice@example.com auth=Bearer {JWT} card={VISA}"

    assert redact_text(line) == (
        "user=[REDACTED:email] auth=Bearer [REDACTED:bearer_token] "
        "card=[REDACTED:card_number]"
    )


def test_every_class_found_is_a_known_class() -> None:
    """Policies can rely on CLASSES naming every class inspect reports."""
    everything: list[object] = [JWT, PEM, AWS_KEY_ID, GITHUB_TOKEN, SLACK_TOKEN]
    everything += [GOOGLE_KEY, VISA, "a@b.cd", "Bearer 0a1b2c3d4e", {"password": 1}]

    assert inspect(everything).classes <= CLASSES
