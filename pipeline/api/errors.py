"""API errors: a stable machine-readable ``code``, the JSON ``path`` of the offending value
(``data[3].price``) and a message for people. Responses carry a list of them:
``{"errors": [{"code": ..., "path": ..., "message": ...}]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Every code the API returns, with the HTTP status it implies on its own.
CODES: dict[str, int] = {
    "bad_body": 400,            # not JSON, not an object, 'data' not a list
    "bad_query": 400,           # malformed query parameter (limit, sort, include, filter value)
    "unknown_field": 400,       # a field (or filter/sort name) the entity does not expose
    "wrong_type": 422,          # a value of the wrong JSON type or format
    "null_not_allowed": 422,    # null for a NOT NULL column
    "required": 422,            # a required field is missing on create/replace
    "min_length": 422,
    "max_length": 422,
    "min_value": 422,
    "max_value": 422,
    "pattern": 422,
    "enum": 422,
    "not_creatable": 422,       # a field that cannot be set on create
    "immutable_field": 422,     # a non-editable field changed on update
    "missing_id": 422,          # a batch update item without its key
    "key_mismatch": 422,        # the body's key differs from the URL's
    "invalid_value": 422,       # PostgreSQL rejected the value (22xxx)
    "check_violation": 422,     # a CHECK constraint failed
    "foreign_key_violation": 409,
    "duplicate": 409,           # unique violation
    "has_children": 409,        # DELETE while child rows exist
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "rate_limited": 429,
    "invalid_config": 422,      # POST /-/reload: the new dx.yaml is refused (old one stays)
    "unavailable": 503,
    "internal_error": 500,      # a failure inside dx (details only in the operator log)
}


@dataclass(frozen=True)
class Problem:
    code: str
    message: str
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.path is not None:
            out["path"] = self.path
        return out


class ApiError(Exception):
    """One or more problems that end the request; ``status`` defaults from the codes."""

    def __init__(self, problems: list[Problem] | Problem, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.problems = problems if isinstance(problems, list) else [problems]
        self.status = status or status_for(self.problems)
        self.headers = headers or {}
        super().__init__("; ".join(p.message for p in self.problems))


def status_for(problems: list[Problem]) -> int:
    statuses = {CODES.get(p.code, 400) for p in problems}
    if len(statuses) == 1:
        return statuses.pop()
    return 422 if all(s in (400, 409, 422) for s in statuses) else max(statuses)


def fail(code: str, message: str, path: str | None = None, *, status: int | None = None,
         headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(Problem(code, message, path), status, headers)


def join_path(prefix: str, name: str | int) -> str:
    """``data[3]`` + ``price`` -> ``data[3].price``; ``data`` + 3 -> ``data[3]``."""
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else name
