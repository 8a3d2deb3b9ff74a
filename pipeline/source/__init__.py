"""Source workers: inbound topics validated and applied to the shop's tables exactly once."""
