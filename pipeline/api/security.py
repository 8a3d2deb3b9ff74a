"""API keys, scopes and rate limits.

Keys come from the environment (``secret_env`` names the variable) or as a SHA-256 in dx.yaml
(``secret_sha256``) or the console's ``dx.api_key``; either way only the hash is kept in memory and
a presented key is hashed and looked up by that digest (one dictionary lookup however many keys
there are; a caller cannot choose a digest, so the lookup's timing tells nothing about a secret).
Console keys, revocations included, reach every replica with the watcher's reload (within
seconds); OAuth2 clients and their tokens: ``pipeline.api.oauth``. A key's
``scopes`` grant ``read``/``write``/``delete`` per entity
alias (``*`` for every entity). The request log carries the key id, never the secret.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.api.errors import fail
from pipeline.config.api import ApiConfig, RateLimit
from pipeline.errors import ConfigError

SCOPE_BY_METHOD = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write",
                   "PATCH": "write", "DELETE": "delete"}


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated API client."""

    id: str
    system: str
    scopes: Mapping[str, frozenset[str]]
    admin: bool
    rate: RateLimit
    kind: str = "key"  # "key" (an API key) or "client" (an OAuth2 access token)

    def may(self, alias: str, scope: str) -> bool:
        granted = self.scopes.get(alias, self.scopes.get("*", frozenset()))
        return scope in granted

    def knows(self, alias: str) -> bool:
        return alias in self.scopes or "*" in self.scopes


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per key id (in this process)."""

    buckets: dict[str, _Bucket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key_id: str, rate: RateLimit) -> float:
        """0 when the request may proceed, else seconds until it may."""
        now = time.monotonic()
        per_s = rate.requests / rate.per_s
        with self.lock:
            b = self.buckets.get(key_id)
            if b is None:
                b = self.buckets[key_id] = _Bucket(float(rate.requests), now)
            b.tokens = min(float(rate.requests), b.tokens + (now - b.at) * per_s)
            b.at = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / per_s


def secret_digest(what: str, secret_env: str | None, secret_sha256: str | None,
                  env: Mapping[str, str], file: str) -> str:
    """The SHA-256 a credential is checked against: of the secret in ``secret_env`` (read from
    the environment, never from the file), or the digest configured as ``secret_sha256``."""
    if secret_env is not None:
        secret = env.get(secret_env, "")
        if not secret:
            raise ConfigError(f"{what}: environment variable {secret_env} is not set", file=file)
        return hash_key(secret)
    assert secret_sha256 is not None
    return secret_sha256


class KeyRing:
    """The configured keys by hash."""

    def __init__(self, api: ApiConfig, env: Mapping[str, str] | None = None, *,
                 file: str = "dx.yaml") -> None:
        source = os.environ if env is None else env
        self._by_hash: dict[str, Principal] = {}
        for k in api.keys:
            digest = secret_digest(f"api key {k.id!r}", k.secret_env, k.secret_sha256, source,
                                   file)
            self._by_hash[digest] = Principal(
                id=k.id, system=k.system, admin=k.admin, rate=k.rate_limit or api.rate_limit,
                scopes={alias: frozenset(s) for alias, s in k.scopes.items()})

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, presented: str | None) -> Principal:
        if not presented:
            raise fail("unauthorized", "an API key is required (X-Api-Key header or "
                                       "Authorization: Bearer)",
                       headers={"WWW-Authenticate": "Bearer"})
        found = self._by_hash.get(hash_key(presented))
        if found is None:
            raise fail("unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
