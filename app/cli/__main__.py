"""``python -m app.cli ...`` runs the console script (same as ``clipshot ...``)."""

import sys

from app.cli.main import main

sys.exit(main())
