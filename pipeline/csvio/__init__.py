"""CSV through the pipeline: imports become inbound events, exports are consistent snapshots."""
