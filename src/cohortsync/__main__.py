"""
``python -m cohortsync``: the command line.
"""

import sys

from cohortsync._cli import main

sys.exit(main())
