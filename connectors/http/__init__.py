"""HTTP connector: REST APIs and webhooks (see configuration.py for every setting)."""
