import sys

from dawnchorus.cli import main

sys.exit(main())
