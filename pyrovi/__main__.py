"""``python -m pyrovi``: the ``pyrovi`` command line (see :mod:`pyrovi.cli`)."""

import sys

from pyrovi.cli import main

sys.exit(main())
