"""`python -m dq3jax.cli`: the console script without an installed entry point."""

import sys

from dq3jax.cli import main

sys.exit(main())
