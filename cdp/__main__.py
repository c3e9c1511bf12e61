import sys

from cdp.cli import main

sys.exit(main())
