"""``python -m phasewatch``: the command line (:func:`phasewatch.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
