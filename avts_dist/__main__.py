import sys

from avts_dist.cli import main

sys.exit(main())
