"""Alerts: rules evaluated periodically, one notification per incident and one on recovery."""
