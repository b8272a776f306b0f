"""``python -m chunkvale`` is the ``chunkvale`` command."""

import sys

from .cli import main

sys.exit(main())
