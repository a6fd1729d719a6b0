"""Entry point of `python3 -m handler <operation>` (what the bin/ scripts exec)."""
from __future__ import annotations

import sys

from handler.main import main

raise SystemExit(main(sys.argv[1:]))
