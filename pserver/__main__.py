"""``python -m pserver`` runs the command line."""

from pserver.cli import main

main()
