"""`python -m fastsr.train ...`: the same as `fastsr train ...`."""
import sys

from fastsr.train.cli import main

sys.exit(main())
