"""``python -m dispatch_aio``: the ``dispatch-aio`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
