"""``python -m robustedge.cli`` (and ``torchrun -m robustedge.cli``): the ``robustedge`` command."""

import sys

from robustedge.cli import main

sys.exit(main())
