"""``python -m dpfeta``: the same as the ``dpfeta`` console script."""

import sys

from dpfeta.cli import main

sys.exit(main())
