"""The ``sql`` sink connector (SQLAlchemy Core): MySQL/MariaDB, SQLite, and other dialects."""
