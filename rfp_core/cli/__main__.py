"""`python -m rfp_core.cli` is `rfp`."""

import sys

from rfp_core.cli import main

sys.exit(main())
