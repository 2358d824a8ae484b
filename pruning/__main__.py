"""``python -m pruning``: same as the ``wanda-prune`` console script."""

import sys

from pruning.cli import main

sys.exit(main())
