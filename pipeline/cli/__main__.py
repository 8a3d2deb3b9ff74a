"""``python -m pipeline.cli`` runs the dx command line (what the console script calls)."""

from pipeline.cli.main import main

main()
