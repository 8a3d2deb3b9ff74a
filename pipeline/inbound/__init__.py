"""Inbound kinds for systems that do not speak Kafka: webhooks (``webhook``), scheduled pulls
(``pull``) and file drops (``files``). Each turns what it receives into JSON messages on the
source route's inbound topic (``produce``), acknowledged by Kafka before it answers, advances a
cursor or moves a file; the route's worker does the rest exactly as for any producer."""
