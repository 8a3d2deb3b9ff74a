"""PostgreSQL connector: batched upserts and deletes into a table of another database."""
