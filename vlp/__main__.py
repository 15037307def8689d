"""``python -m vlp`` runs the command-line interface."""

from vlp.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
