"""``sources[].inbound``: how a system that does not speak Kafka feeds a source route.

Three kinds, any combination per route; all of them produce to the route's inbound topic, so the
route's worker (``dx source run``) validates and applies their entities exactly like any
producer's events:

* ``webhook``: the system POSTs entities to ``dx inbound serve`` (``POST /inbound/<route>``);
* ``pull``: ``dx inbound pull ROUTE`` GETs its REST API on an interval, page by page, from a
  cursor kept in ``dx.inbound_cursor``;
* ``files``: ``dx inbound watch ROUTE`` picks up CSV or JSON-lines files dropped in a folder.

``mapping`` turns the system's records into the route's fields with the sink mapping language
(``select`` / ``fields`` with ``from``, ``const``, ``template``, ``type``, ``default``); without it
records are taken as they are. ``id_fields`` name the route fields that identify one version of
an entity (e.g. ``[id, version]``): the event id is derived from them, so the same entity
version received twice (a re-sent webhook, a page read again after a crash) is the same event.
Without ``id_fields`` the event id is derived from the record's content.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config.auth import (
    ApiKeyAuth,
    BasicAuth,
    BearerAuth,
    OAuth2ClientCredentials,
    ReceivedHmac,
)
from pipeline.config.sinks import MappingConfig, RetryPolicy

_DOTTED = r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$"


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FileFormat = Literal["csv", "jsonl"]
FILE_FORMATS: tuple[FileFormat, ...] = ("csv", "jsonl")
WebhookAuth = Annotated[ReceivedHmac | BearerAuth, Field(discriminator="kind")]
PullAuth = Annotated[BearerAuth | BasicAuth | OAuth2ClientCredentials | ApiKeyAuth,
                     Field(discriminator="kind")]


class WebhookConfig(_Base):
    """``POST /inbound/<route>`` on ``dx inbound serve``: a JSON object (one entity), a JSON
    array, or ``{"data": [...]}``. Answered 2xx only after Kafka acknowledged every entity."""

    auth: WebhookAuth = Field(description="hmac (signature header, replay window) or bearer")
    max_body_bytes: int = Field(1_048_576, ge=64, le=256 * 1_048_576,
                                description="larger bodies are refused (413) before reading")
    max_entities: int = Field(10_000, ge=1, le=1_000_000, description="entities per request")
    idempotency_header: str | None = Field(
        "Idempotency-Key", description="a request carrying a key already accepted is answered "
        "again without producing anything (the same key for other entities: 422); without a key, "
        "id_fields identify a re-sent request; without both, the signature (hmac) or nothing "
        "(bearer: every request is produced)")
    ack_timeout_s: float = Field(10, gt=0, le=300,
                                 description="answer 503 when Kafka has not acknowledged by then")


class Pagination(_Base):
    """How the endpoint pages: ``page`` (page number), ``offset`` (item offset), ``cursor`` (a
    token from the response sent back as a parameter), ``next`` (a URL in the response or the
    ``Link: rel="next"`` header), or ``none`` (one response holds everything)."""

    kind: Literal["page", "offset", "cursor", "next", "none"] = "none"
    param: str | None = Field(None, description="page/offset/cursor query parameter "
                              "(default page, offset, cursor)")
    size_param: str | None = Field(None, description="page size parameter, e.g. limit")
    size: int = Field(100, ge=1, le=100_000, description="entities per page")
    start: int = Field(1, ge=0, description="first page number (page kind)")
    token_path: str | None = Field(None, description="cursor: response path of the next token; "
                                   "next: response path of the next URL (default: Link header)")

    @property
    def parameter(self) -> str:
        return self.param or {"page": "page", "offset": "offset"}.get(self.kind, "cursor")

    @model_validator(mode="after")
    def _consistent(self) -> Pagination:
        if self.kind == "cursor" and not self.token_path:
            raise ValueError("cursor pagination needs token_path (where the next token is)")
        return self


class Incremental(_Base):
    """Only what changed: the largest ``field`` value seen (a timestamp, id or version, in the
    system's own terms, before mapping) is sent as ``param`` on the next run."""

    param: str = Field(description="query parameter, e.g. updated_since")
    field: str = Field(description="record field whose largest value is the next cursor")
    initial: str | None = Field(None, description="cursor of the first run (default: none)")
    compare: Literal["text", "number"] = Field(
        "text", description="how values are ordered: ISO timestamps as text, ids as numbers")
    keyset: bool = Field(
        False, description="page/offset: ask every page from the largest value seen so far, at "
        "the first page, so an entity changed mid-run cannot shift another past the pages "
        "read (the endpoint must order by field, ascending; field unique, or param inclusive)")


class PullConfig(_Base):
    """``dx inbound pull ROUTE``: GET ``url`` every ``interval_s``, follow the pages, produce
    the entities; the cursor moves on only after Kafka acknowledged a page."""

    url: str = Field(description="endpoint, e.g. https://pim.example/api/products")
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="fixed query parameters")
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers (no secrets)")
    auth: PullAuth | None = Field(None, description="bearer, basic, oauth2 (client "
                                  "credentials) or api_key; secrets from ${VAR}")
    items: str | None = Field(None, description="response path of the list (e.g. data); "
                              "default: the response is the list")
    pagination: Pagination = Field(default_factory=Pagination, description="how to page")
    incremental: Incremental | None = Field(None, description="ask only for changes")
    interval_s: float = Field(60, gt=0, le=86_400, description="seconds between runs")
    retry: RetryPolicy = Field(default_factory=RetryPolicy,
                               description="transient failures (5xx, 429, timeouts) per request")
    rate_limit_per_s: float | None = Field(None, gt=0, description="max requests per second")
    timeout_s: float = Field(30, gt=0, le=600, description="whole-request timeout")
    max_pages: int = Field(100_000, ge=1, description="a run stops after this many pages")
    max_page_mb: float = Field(
        16, gt=0, le=1024, description="largest page body (read in chunks, never more: a "
        "larger page fails the run; lower pagination.size)")
    ack_timeout_s: float = Field(30, gt=0, le=600, description="wait this long for Kafka")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("items")
    @classmethod
    def _items(cls, v: str | None) -> str | None:
        if v is not None and not re.match(_DOTTED, v):
            raise ValueError("a path of names joined by dots, e.g. data or result.items")
        return v

    @model_validator(mode="after")
    def _keyset(self) -> PullConfig:
        if self.incremental is not None and self.incremental.keyset and \
                self.pagination.kind not in ("page", "offset"):
            raise ValueError("incremental.keyset needs page or offset pagination (a cursor or "
                             "next link already pages consistently)")
        return self


class FilesConfig(_Base):
    """``dx inbound watch ROUTE``: files that appear complete in ``directory`` go through the
    checks of ``dx import``, then move to ``done/`` or ``failed/`` (with the reject file)."""

    directory: str = Field(description="watched folder (done/ and failed/ are created in it)")
    complete: Literal["rename", "marker"] = Field(
        "rename", description="rename: writers use a temporary name (.tmp, .part or a leading "
        "dot) and rename; marker: FILE is read once FILE.done exists")
    formats: list[FileFormat] = Field(
        default_factory=lambda: list(FILE_FORMATS),
        description="by extension: .csv, .jsonl/.ndjson")
    poll_s: float = Field(2, gt=0, le=3600, description="how often the folder is scanned")
    ack_timeout_s: float = Field(60, gt=0, le=3600, description="wait this long for Kafka")


class InboundConfig(_Base):
    """Systems that do not speak Kafka feeding this route's topic: ``webhook`` (``dx inbound
    serve``), ``pull`` (``dx inbound pull ROUTE``) and ``files`` (``dx inbound watch ROUTE``),
    any combination. The route's worker (``dx source run``) applies what they receive."""

    mapping: MappingConfig | None = Field(
        None, description="system fields -> route fields (the sink mapping language)")
    id_fields: list[str] | None = Field(
        None, description="route fields identifying one entity version (event id); default "
        "the record's content")
    webhook: WebhookConfig | None = Field(None, description="receive webhooks")
    pull: PullConfig | None = Field(None, description="pull a REST endpoint on a schedule")
    files: FilesConfig | None = Field(None, description="pick up dropped CSV / JSON-lines files")

    @model_validator(mode="after")
    def _some(self) -> InboundConfig:
        if self.webhook is None and self.pull is None and self.files is None:
            raise ValueError("give at least one of webhook, pull, files")
        if self.id_fields is not None and (not self.id_fields
                                           or len(set(self.id_fields)) != len(self.id_fields)):
            raise ValueError("id_fields: unique names, at least one")
        return self

    def kinds(self) -> list[str]:
        return [k for k in ("webhook", "pull", "files") if getattr(self, k) is not None]

