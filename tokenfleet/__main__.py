"""``python -m tokenfleet``: the same as the ``tokenfleet`` command."""

from __future__ import annotations

import sys

from tokenfleet.cli import main

if __name__ == "__main__":
    sys.exit(main())
