"""Change capture: dx's own tables, per-table triggers, the application outbox API, snapshots."""
