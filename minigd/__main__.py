import sys

from minigd.cli import main

sys.exit(main())
