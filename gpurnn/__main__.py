import sys

from gpurnn.cli import main

sys.exit(main())
