"""``python -m alignseg ...`` (and ``torchrun -m alignseg ...``): the same as the ``alignseg`` command."""

import sys

from .cli import main

sys.exit(main())
