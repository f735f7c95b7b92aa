"""``python -m veritas_resilience``: see :mod:`veritas_resilience.cli`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
