-- Runs once, when the postgres container initialises an empty data volume
-- (/docker-entrypoint-initdb.d). The `dx` database is created by POSTGRES_DB; the schema
-- registry keeps its storage in a database of its own.
CREATE DATABASE registry;
