import sys

from vivace.cli import main

sys.exit(main())
