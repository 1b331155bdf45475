"""``python -m pagehint``: the command line."""

from pagehint.cli import main

raise SystemExit(main())
