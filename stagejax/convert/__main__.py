"""``python -m stagejax.convert``: see `stagejax.convert`."""

import sys

from stagejax.convert import main

sys.exit(main())
