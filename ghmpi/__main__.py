"""`python -m ghmpi ...`: see ghmpi/cli.py."""

import sys

from ghmpi.cli import main

if __name__ == "__main__":
    sys.exit(main())
