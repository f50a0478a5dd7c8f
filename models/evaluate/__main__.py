"""``python -m models.evaluate``: the held-out evaluation (see models.evaluate)."""

import sys

from models.evaluate.cli import main

sys.exit(main())
