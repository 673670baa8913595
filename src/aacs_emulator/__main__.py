"""``python -m aacs_emulator``: the same as the ``aacs-emulator`` command."""

import sys

from aacs_emulator.cli import main

sys.exit(main())
