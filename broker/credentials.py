"""What the broker presents downstream: its own credential, never the agent's.

A manifest names one of: nothing, a static secret from the broker's
environment, or an OAuth access token that the broker itself obtains with the
client-credentials grant for the downstream's own audience (RFC 8707
``resource``). The agent's bearer token is not an input to anything here.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable

import anyio
import httpx2

from broker.errors import ConfigError, DownstreamFailed
from broker.manifest import Credential

# Renew a fetched token this long before the issuer says it expires.
EXPIRY_MARGIN_SECONDS = 30.0


class CredentialSource:
    """Gives the header a downstream request should carry, if any."""

    def __init__(
        self,
        credential: Credential,
        *,
        clock: Callable[[], float] = time.time,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        self.credential = credential
        self._clock = clock
        self._http = http_client
        self._token = ""
        self._token_expires = 0.0
        self._lock = anyio.Lock()

    def check(self) -> None:
        """Refuse to start when a secret the manifest names is not set."""
        variable = {
            "env": self.credential.variable,
            "client_credentials": self.credential.client_secret_variable,
        }.get(self.credential.kind)
        if variable and not os.environ.get(variable):
            raise ConfigError(f"environment variable {variable} is not set")

    def stdio_env(self) -> dict[str, str]:
        """Environment entries a stdio server gets for a static secret."""
        if self.credential.kind == "env":
            return {
                self.credential.variable: os.environ.get(self.credential.variable, "")
            }
        return {}

    async def header(self) -> tuple[str, str] | None:
        cred = self.credential
        if cred.kind == "none":
            return None
        if cred.kind == "env":
            secret = os.environ.get(cred.variable, "")
            if not secret:
                raise DownstreamFailed(f"environment variable {cred.variable} is empty")
            value = f"{cred.scheme} {secret}" if cred.scheme else secret
            return cred.header, value
        return "Authorization", f"Bearer {await self._client_credentials_token()}"

    async def _client_credentials_token(self) -> str:
        async with self._lock:
            if self._token and self._clock() < self._token_expires:
                return self._token
            self._token, lifetime = await self._fetch_token()
            self._token_expires = self._clock() + max(
                lifetime - EXPIRY_MARGIN_SECONDS, 0.0
            )
            return self._token

    async def _fetch_token(self) -> tuple[str, float]:
        cred = self.credential
        secret = os.environ.get(cred.client_secret_variable, "")
        form = {
            "grant_type": "client_credentials",
            "resource": cred.audience,
            "audience": cred.audience,
        }
        if cred.scope:
            form["scope"] = cred.scope
        client = self._http or httpx2.AsyncClient(timeout=10.0)
        try:
            response = await client.post(
                cred.token_url, data=form, auth=(cred.client_id, secret)
            )
            body = response.json() if response.status_code == 200 else {}
        except (httpx2.HTTPError, ValueError) as exc:
            raise DownstreamFailed(
                f"token endpoint {cred.token_url} failed: {exc}"
            ) from exc
        finally:
            if self._http is None:
                await client.aclose()
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise DownstreamFailed(
                f"token endpoint {cred.token_url} answered {response.status_code} "
                "without an access_token"
            )
        lifetime = body.get("expires_in", 300)
        return token, float(lifetime) if isinstance(lifetime, int | float) else 300.0


class BrokerAuth(httpx2.Auth):
    """Puts the broker's credential on every request to an HTTP downstream."""

    def __init__(self, source: CredentialSource) -> None:
        self.source = source

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        # Whatever the transport copied in, no Authorization but ours leaves.
        request.headers.pop("Authorization", None)
        header = await self.source.header()
        if header is not None:
            request.headers[header[0]] = header[1]
        yield request
