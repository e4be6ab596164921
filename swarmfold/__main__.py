import sys

from swarmfold.cli import main

sys.exit(main())
