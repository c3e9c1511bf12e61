import sys

from cdp.cli import main

if __name__ == "__main__":
    sys.exit(main())
