"""``python -m seresnet``: the ``seresnet`` console script."""
import sys

from seresnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
