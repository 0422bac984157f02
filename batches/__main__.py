"""``python -m batches enqueue|batch|orchestrator ...``."""

from __future__ import annotations

import sys

from batches.cli import main

sys.exit(main())
