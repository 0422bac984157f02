"""``python -m gateway``: run the gateway with settings from the environment."""

from __future__ import annotations

import sys

from gateway.server import run
from shared.settings import Settings

if __name__ == "__main__":
    sys.exit(run(Settings()))
