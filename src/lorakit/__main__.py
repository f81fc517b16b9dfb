"""``python -m lorakit`` is the ``lorakit`` command."""

import sys

from lorakit.cli import main

sys.exit(main())
