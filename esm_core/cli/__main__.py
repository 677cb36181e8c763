"""``python -m esm_core.cli``: the ``esm-studio`` command without the installed entry point (e.g. on a bare GPU image)."""
import sys

from . import main

sys.exit(main())
