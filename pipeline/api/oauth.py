"""OAuth2 client credentials (RFC 6749 §4.4): ``POST /oauth/token`` and the bearer tokens it
issues.

Clients are declared in ``api.clients`` like keys (secret from an environment variable or as a
SHA-256, scopes per entity and method). Tokens are **opaque random strings kept in this
process's memory** with their expiry, stored only as SHA-256: nothing to sign, no signing secret
to manage, and revocation is exact — a reload that removes a client (or changes its secret)
drops its tokens at once, and a token's scopes are re-checked against the client's current
scopes on every request. The price: tokens do not survive a restart (clients ask again, which
client-credentials clients do anyway) and are not shared between replicas, like the rate limiter.

Scopes on the wire are ``alias:method`` words, space-separated (``products:read
variants:write``; ``*:read`` for every entity). Without ``scope`` a token carries all of the
client's scopes; with it, each word must be granted to the client (``invalid_scope``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote_plus

from pipeline.api.errors import fail
from pipeline.api.security import Principal, RateLimiter, hash_key, secret_digest
from pipeline.config.api import ApiConfig

#: Every issued token starts with this, so a bearer value is told from an API key without lookup.
TOKEN_PREFIX = "dxat_"  # noqa: S105 (a prefix, not a secret)
#: Live tokens kept per client; issuing more drops the oldest (issuing is rate limited too).
MAX_TOKENS_PER_CLIENT = 1000
_METHODS = ("read", "write", "delete")
#: Largest token request body (a form with an id, a secret and scopes), enforced before it is
#: read by :class:`pipeline.api.body_limit.BodyLimit`.
MAX_BODY = 8192

Scopes = Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class Client:
    """A configured OAuth2 client (its secret only as SHA-256)."""

    principal: Principal
    digest: str
    lifetime_s: int


class ClientRing:
    """The configured clients by id."""

    def __init__(self, api: ApiConfig, env: Mapping[str, str] | None = None, *,
                 file: str = "dx.yaml") -> None:
        source = os.environ if env is None else env
        self._by_id: dict[str, Client] = {}
        for c in api.clients:
            digest = secret_digest(f"api client {c.id!r}", c.secret_env, c.secret_sha256,
                                   source, file)
            self._by_id[c.id] = Client(
                principal=Principal(
                    id=c.id, system=c.system, admin=False, kind="client",
                    rate=c.rate_limit or api.rate_limit,
                    scopes={alias: frozenset(s) for alias, s in c.scopes.items()}),
                digest=digest, lifetime_s=c.token_lifetime_s or api.token_lifetime_s)

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, client_id: str) -> Client | None:
        return self._by_id.get(client_id)

    def authenticate(self, client_id: str, secret: str) -> Client | None:
        """The client when the secret is its own (compared by hash, in constant time)."""
        client = self._by_id.get(client_id)
        known = client.digest if client is not None else "0" * 64
        ok = hmac.compare_digest(known, hash_key(secret))
        return client if ok and client is not None else None


# ---- scopes -----------------------------------------------------------------------------------

def _granted(scopes: Scopes, alias: str) -> frozenset[str]:
    return scopes.get(alias, scopes.get("*", frozenset()))


def intersect(a: Scopes, b: Scopes) -> dict[str, frozenset[str]]:
    """The scopes granted by both ``a`` and ``b`` (``*`` read as "any other entity")."""
    out: dict[str, frozenset[str]] = {}
    for alias in set(a) | set(b):
        s = _granted(a, alias) & _granted(b, alias)
        if s:
            out[alias] = s
    return out


def format_scopes(scopes: Scopes) -> str:
    return " ".join(f"{alias}:{m}" for alias in sorted(scopes) for m in _METHODS
                    if m in scopes[alias])


def parse_scope(raw: str, allowed: Scopes, aliases: Collection[str]) -> dict[str, frozenset[str]]:
    """The scopes a token request asks for, each granted to the client (else invalid_scope)."""
    wanted: dict[str, set[str]] = {}
    for word in raw.split(" "):
        if not word:
            continue
        alias, sep, method = word.partition(":")
        if not sep or method not in _METHODS:
            raise OAuthError("invalid_scope", f"{word!r}: scopes are alias:read, alias:write "
                                              "or alias:delete ('*' for every entity)")
        if alias != "*" and alias not in aliases:
            raise OAuthError("invalid_scope", f"{word!r}: no entity {alias!r}")
        granted = allowed.get("*", frozenset()) if alias == "*" else _granted(allowed, alias)
        if method not in granted:
            raise OAuthError("invalid_scope", f"{word!r} is beyond this client's scopes")
        wanted.setdefault(alias, set()).add(method)
    if not wanted:
        raise OAuthError("invalid_scope", "scope is empty")
    return {alias: frozenset(m) for alias, m in wanted.items()}


# ---- tokens -----------------------------------------------------------------------------------

@dataclass
class _Token:
    client_id: str
    client_digest: str
    scopes: dict[str, frozenset[str]]
    expires: float  # time.monotonic()


@dataclass
class TokenStore:
    """Issued access tokens by SHA-256 (the tokens themselves are never kept)."""

    tokens: dict[str, _Token] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, client: Client, scopes: dict[str, frozenset[str]]) -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.monotonic()
        with self.lock:
            for digest in [d for d, t in self.tokens.items() if t.expires <= now]:
                del self.tokens[digest]
            mine = [d for d, t in self.tokens.items() if t.client_id == client.principal.id]
            for digest in mine[:max(0, len(mine) - MAX_TOKENS_PER_CLIENT + 1)]:
                del self.tokens[digest]  # oldest first (dicts keep insertion order)
            self.tokens[hash_key(token)] = _Token(client.principal.id, client.digest, scopes,
                                                  now + client.lifetime_s)
        return token

    def authenticate(self, token: str, clients: ClientRing) -> Principal:
        """The client behind a live token, with the token's scopes narrowed to the client's
        current ones; 401 for an unknown, expired or revoked token."""
        digest = hash_key(token)
        with self.lock:
            found = self.tokens.get(digest)
            if found is not None and found.expires <= time.monotonic():
                del self.tokens[digest]
                raise _invalid_token("the access token has expired")
        if found is None:
            raise _invalid_token("unknown or revoked access token")
        client = clients.get(found.client_id)
        if client is None or not hmac.compare_digest(client.digest, found.client_digest):
            with self.lock:
                self.tokens.pop(digest, None)
            raise _invalid_token("unknown or revoked access token")
        p = client.principal
        return Principal(id=p.id, system=p.system, admin=False, rate=p.rate, kind="client",
                         scopes=intersect(found.scopes, p.scopes))

    def retain(self, clients: ClientRing) -> int:
        """Drop the tokens of clients that are gone or whose secret changed (after a reload);
        the number dropped."""
        with self.lock:
            gone = [d for d, t in self.tokens.items()
                    if (c := clients.get(t.client_id)) is None or c.digest != t.client_digest]
            for d in gone:
                del self.tokens[d]
        return len(gone)

    def __len__(self) -> int:
        return len(self.tokens)


def _invalid_token(message: str) -> Exception:
    return fail("unauthorized", message,
                headers={"WWW-Authenticate": f'Bearer error="invalid_token", '
                                             f'error_description="{message}"'})


# ---- the token endpoint -----------------------------------------------------------------------

class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    STATUS: ClassVar[dict[str, int]] = {"invalid_client": 401, "rate_limited": 429}

    def __init__(self, error: str, description: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = self.STATUS.get(error, 400)
        self.headers = {"Cache-Control": "no-store", "Pragma": "no-cache", **(headers or {})}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="dx", charset="UTF-8"'}


def _form(content_type: str, raw: bytes) -> dict[str, str]:
    if content_type.split(";", 1)[0].strip().lower() != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not valid form data") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name!r} is repeated")
        form[name] = value
    return form


def _credentials(authorization: str, form: dict[str, str]) -> tuple[str, str, bool]:
    """(client_id, secret, via Basic) from HTTP Basic or the form (never both)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        if "client_secret" in form:
            raise OAuthError("invalid_request", "use one client authentication method "
                                                "(HTTP Basic or client_secret), not both")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError("invalid_client", "malformed HTTP Basic credentials",
                             _BASIC_CHALLENGE) from None
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            raise OAuthError("invalid_client", "malformed HTTP Basic credentials",
                             _BASIC_CHALLENGE)
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)  # RFC 6749 §2.3.1
        if form.get("client_id", client_id) != client_id:
            raise OAuthError("invalid_request", "client_id differs from the HTTP Basic user")
        return client_id, secret, True
    if "client_id" in form and "client_secret" in form:
        return form["client_id"], form["client_secret"], False
    raise OAuthError("invalid_client", "client authentication is required (HTTP Basic, or "
                                       "client_id and client_secret)", _BASIC_CHALLENGE)


@dataclass(frozen=True)
class Issued:
    client_id: str
    body: dict[str, Any]


def token_request(*, content_type: str, authorization: str, raw: bytes, clients: ClientRing,
                  tokens: TokenStore, limiter: RateLimiter, aliases: Collection[str],
                  on_client: Any = None) -> Issued:
    """Handle one ``POST /oauth/token``: the token response, or :class:`OAuthError`.
    ``on_client(id)`` is called once the client is authenticated (for the request log)."""
    form = _form(content_type, raw)
    client_id, secret, basic = _credentials(authorization, form)
    client = clients.authenticate(client_id, secret)
    if client is None:
        raise OAuthError("invalid_client", "unknown client or wrong secret",
                         _BASIC_CHALLENGE if basic else None)
    if on_client is not None:
        on_client(client_id)
    wait = limiter.take(f"client:{client_id}", client.principal.rate)
    if wait > 0:
        raise OAuthError("rate_limited", "too many requests for this client",
                         {"Retry-After": str(max(1, round(wait)))})
    grant = form.get("grant_type")
    if not grant:
        raise OAuthError("invalid_request", "grant_type is required")
    if grant != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is "
                                                   "supported")
    allowed = client.principal.scopes
    raw_scope = form.get("scope")
    scopes = (dict(allowed) if raw_scope is None
              else parse_scope(raw_scope, allowed, aliases))
    token = tokens.issue(client, scopes)
    return Issued(client_id, {"access_token": token, "token_type": "Bearer",
                              "expires_in": client.lifetime_s, "scope": format_scopes(scopes)})
