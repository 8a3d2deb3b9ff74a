"""The relay: moves committed outbox rows to Kafka, in commit order, nothing lost or skipped."""
