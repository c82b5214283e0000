import sys

from cellvi._cli import main

sys.exit(main())
