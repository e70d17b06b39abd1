"""`python -m bench`: runs the benchmark."""

import sys

from bench.cli import main

sys.exit(main())
