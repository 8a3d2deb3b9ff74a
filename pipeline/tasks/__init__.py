"""The task store: every event a route handles is a task operators can list, retry and export."""

from pipeline.tasks.store import STATUSES, TaskFilter, TaskRow, TaskStore, ensure_schema
from pipeline.tasks.writer import TaskWriter

__all__ = ["STATUSES", "TaskFilter", "TaskRow", "TaskStore", "TaskWriter", "ensure_schema"]
