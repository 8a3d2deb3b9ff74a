"""Route-level operator state shared by workers, the CLI and the console (pause/resume)."""
