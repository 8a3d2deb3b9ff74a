"""The ``api:`` section of dx.yaml: the Data Exchange API (``dx api serve``).

Entities are declared, not coded: an ``alias`` (the URL segment) over one table, the exposed
``fields`` keyed by their public name (an allow-list: no other column is readable, writable or
filterable), per-field ``creatable``/``editable`` and validation rules, whether deletes are
allowed, and child ``relations`` by foreign-key field mapping. Keys and OAuth2 clients name the
*environment variable* holding the secret (or a SHA-256 of it), never the secret itself.

Shape checks live here (unknown keys rejected, file and line in every error); everything that
needs the live catalog (columns exist, types fit the rules, the key is exposed) is checked when
the API starts, by ``pipeline.api.catalog``, again with the dx.yaml line.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config.names import TableRef

_ALIAS = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_PUBLIC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")

#: Query parameters of list endpoints; a field cannot be called like one of them.
RESERVED_FIELDS = frozenset({"offset", "limit", "sort", "include", "data"})
#: Path segments the API serves itself; an entity cannot be called like one of them.
RESERVED_ALIASES = frozenset({"docs", "redoc", "openapi", "healthz", "readyz", "metrics",
                              "oauth"})

Scope = Literal["read", "write", "delete"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiField(_Base):
    """One exposed field: a column under a public name, with its write rules."""

    column: str | None = Field(None, description="table column; default the public name")
    creatable: bool = Field(True, description="may be set by POST (and PUT creating a row)")
    editable: bool = Field(True, description="may be changed by PUT/PATCH of a stored row")
    required: bool = Field(
        False, description="must be given on create (implied for NOT NULL columns without default)"
    )
    min_length: int | None = Field(None, ge=0, description="minimum string length")
    max_length: int | None = Field(None, ge=0, description="maximum string length")
    min_value: float | None = Field(None, description="minimum number (inclusive)")
    max_value: float | None = Field(None, description="maximum number (inclusive)")
    pattern: str | None = Field(None, description="regular expression a string must contain "
                                                 "(JSON Schema semantics: anchor with ^...$)")
    enum: list[str | int] | None = Field(None, min_length=1, description="allowed values")
    filter: bool = Field(True, description="may be used in list filters")
    sort: bool = Field(True, description="may be used in 'sort='")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return v

    @model_validator(mode="after")
    def _ranges(self) -> ApiField:
        if (self.min_length is not None and self.max_length is not None
                and self.min_length > self.max_length):
            raise ValueError("min_length is greater than max_length")
        if (self.min_value is not None and self.max_value is not None
                and self.min_value > self.max_value):
            raise ValueError("min_value is greater than max_value")
        if self.required and not self.creatable:
            raise ValueError("a required field must be creatable")
        return self


class ApiRelation(_Base):
    """A child relation: rows of ``entity`` whose fields equal the parent's (a foreign key)."""

    entity: str = Field(description="alias of the child entity")
    on: dict[str, str] = Field(
        min_length=1, description="parent field -> child field (the foreign-key mapping)"
    )


class ApiEntity(_Base, TableRef):
    """One resource of the API over one table."""

    table_ref: ClassVar[str] = "table"

    alias: str = Field(description="resource name: the URL segment /{alias}")
    table: str = Field(description="table, optionally schema-qualified (default public)")
    fields: dict[str, ApiField] = Field(
        min_length=1, description="exposed fields by public name (allow-list); {} for defaults"
    )
    key: list[str] | None = Field(
        None, description="public names of the key fields; default the primary key"
    )
    delete: bool = Field(False, description="DELETE is allowed (refused while children exist)")
    relations: dict[str, ApiRelation] = Field(
        default_factory=dict, description="child relations by name (include=NAME, NAME.field=)"
    )
    max_limit: int | None = Field(None, ge=1, le=100_000,
                                  description="page size cap; default api.max_limit")

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not _ALIAS.match(v):
            raise ValueError("use lowercase letters, digits and '_', starting with a letter")
        if v in RESERVED_ALIASES:
            raise ValueError(f"{v!r} is reserved (the API serves it itself)")
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, ApiField]) -> dict[str, ApiField]:
        columns: dict[str, str] = {}
        for name, f in v.items():
            if not _PUBLIC.match(name):
                raise ValueError(f"field name {name!r}: use letters, digits and '_'")
            if name in RESERVED_FIELDS:
                raise ValueError(f"field name {name!r} is reserved (a query parameter)")
            col = f.column or name
            if col in columns:
                raise ValueError(f"fields {columns[col]!r} and {name!r} expose the same column")
            columns[col] = name
        return v

    @field_validator("relations")
    @classmethod
    def _relations(cls, v: dict[str, ApiRelation]) -> dict[str, ApiRelation]:
        for name in v:
            if not _PUBLIC.match(name) or name in RESERVED_FIELDS:
                raise ValueError(f"relation name {name!r}: use letters, digits and '_'")
        return v

    @model_validator(mode="after")
    def _key(self) -> ApiEntity:
        if self.key is not None:
            if not self.key or len(set(self.key)) != len(self.key):
                raise ValueError("key: list unique field names")
            for k in self.key:
                if k not in self.fields:
                    raise ValueError(f"key field {k!r} is not an exposed field")
        for name in self.relations:
            if name in self.fields:
                raise ValueError(f"relation {name!r} has the name of a field")
        return self


class RateLimit(_Base):
    """A token bucket per API key or client: ``requests`` per ``per_s`` seconds, bursts up to
    ``requests``."""

    requests: int = Field(100, ge=1, description="requests allowed per window (burst size)")
    per_s: float = Field(1.0, gt=0, description="window length in seconds")


class _Credential(_Base):
    """What API keys and OAuth2 clients share: id, system, secret (by name or hash), scopes."""

    id: str = Field(description="id: logged with every request (the secret never is)")
    system: str = Field(description="origin recorded for its writes (dx.origin); routes never "
                                    "deliver a change back to its origin")
    secret_env: str | None = Field(None, description="NAME of the environment variable holding "
                                                     "the secret (hashed at start, never stored)")
    secret_sha256: str | None = Field(None, description="hex SHA-256 of the secret "
                                                        "(`dx api hash-key`)")
    scopes: dict[str, list[Scope]] = Field(
        default_factory=dict, description="entity alias (or '*') -> read, write, delete"
    )
    rate_limit: RateLimit | None = Field(None, description="default api.rate_limit")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _KEY_ID.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 100)")
        return v

    @field_validator("secret_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV.match(v):
            raise ValueError("the NAME of an environment variable (not its value, not ${...})")
        return v

    @field_validator("secret_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.match(v):
            raise ValueError("64 lowercase hex digits (`dx api hash-key`)")
        return v

    @model_validator(mode="after")
    def _secret(self) -> _Credential:
        if (self.secret_env is None) == (self.secret_sha256 is None):
            raise ValueError("set exactly one of secret_env and secret_sha256")
        return self


class ApiKey(_Credential):
    """One API key: the system it speaks for (the origin of its writes) and its scopes."""

    admin: bool = Field(False, description="may call POST /-/reload")


class ApiClient(_Credential):
    """One OAuth2 client (client-credentials grant, ``POST /oauth/token``): its secret, the
    system it speaks for and the scopes its tokens may carry."""

    token_lifetime_s: int | None = Field(None, ge=1, le=86_400,
                                         description="access token lifetime; default "
                                                     "api.token_lifetime_s")


class ApiConfig(_Base):
    """The Data Exchange API: REST over the declared entities (``dx api serve``)."""

    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8080, ge=0, le=65535, description="listen port")
    default_limit: int = Field(50, ge=1, description="page size when 'limit' is not given")
    max_limit: int = Field(500, ge=1, le=100_000, description="largest page size")
    max_batch: int = Field(5000, ge=1, le=100_000, description="most rows in one write request")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="largest request body, refused (413) before it is read; /oauth/token: 8 KiB")
    pool_size: int = Field(8, ge=1, le=200, description="PostgreSQL connections")
    statement_timeout_ms: int = Field(30_000, ge=0, description="per statement; 0: none")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="default per-key limit")
    keys: list[ApiKey] = Field(default_factory=list, description="API keys and their scopes")
    clients: list[ApiClient] = Field(default_factory=list,
                                     description="OAuth2 clients (client credentials) and "
                                                 "their scopes")
    token_lifetime_s: int = Field(3600, ge=1, le=86_400,
                                  description="lifetime of OAuth2 access tokens")
    entities: list[ApiEntity] = Field(default_factory=list, description="exposed resources")

    @model_validator(mode="after")
    def _limits(self) -> ApiConfig:
        if self.default_limit > self.max_limit:
            raise ValueError("default_limit is greater than max_limit")
        return self
