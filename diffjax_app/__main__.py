"""``python -m diffjax_app`` is the ``diffjax`` command line."""

import sys

from .cli import main

sys.exit(main())
