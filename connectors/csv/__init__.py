"""CSV connector: the exporter, writing rotated files for people and tools that take files."""
