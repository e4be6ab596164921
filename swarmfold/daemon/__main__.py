"""`python -m swarmfold.daemon ARGS`: a detached peer, as `swarmfold start` launches it."""

import sys

from swarmfold.daemon.service import main

sys.exit(main())
