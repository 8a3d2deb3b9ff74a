"""Credentials dx presents to third-party HTTP systems (sink deliveries, scheduled pulls) and
checks on requests they send to dx (webhooks).

The models live in the configuration layer so both the ``http`` connector and inbound routes
use the same ones. Secrets are ``SecretStr`` and must come from ``${VAR}`` in dx.yaml; they never
appear in logs, task logs or error messages.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Auth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BearerAuth(_Auth):
    """``Authorization: Bearer <token>``."""

    kind: Literal["bearer"]
    token: SecretStr


class BasicAuth(_Auth):
    """HTTP basic authentication."""

    kind: Literal["basic"]
    username: str
    password: SecretStr


class OAuth2ClientCredentials(_Auth):
    """OAuth 2.0 client-credentials grant. The token is cached until shortly before it expires
    and fetched again after a 401."""

    kind: Literal["oauth2"]
    token_url: str
    client_id: str
    client_secret: SecretStr
    scope: str | None = None
    audience: str | None = None
    refresh_margin_s: float = Field(30, ge=0, description="renew this long before expiry")


class HmacAuth(_Auth):
    """Signed webhooks: header ``<header>: t=<unix seconds>,v1=<hex HMAC(secret, "t.body")>``
    (the Stripe scheme; receivers check the timestamp to refuse replays)."""

    kind: Literal["hmac"]
    secret: SecretStr
    header: str = "X-Dx-Signature"
    algorithm: Literal["sha256", "sha512"] = "sha256"


class ApiKeyAuth(_Auth):
    """A static key in a header, e.g. ``X-Api-Key: <key>``."""

    kind: Literal["api_key"]
    key: SecretStr
    header: str = "X-Api-Key"


class ReceivedHmac(HmacAuth):
    """A webhook sender signs with :class:`HmacAuth`'s scheme; dx refuses a signature older or
    newer than ``tolerance_s`` (a replay), compared in constant time."""

    tolerance_s: float = Field(300, gt=0, le=86_400,
                               description="refuse timestamps further than this from now")
