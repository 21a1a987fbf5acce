"""``python -m kneurons``: the same as the ``kneurons`` command."""

import sys

from .cli import main

sys.exit(main())
