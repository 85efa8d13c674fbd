"""``python -m grad_guard.demo``: the same as ``grad-guard demo``."""

import sys

from grad_guard.demo.command import main

sys.exit(main())
