import sys

from cdp.launch import main

if __name__ == "__main__":
    sys.exit(main())
