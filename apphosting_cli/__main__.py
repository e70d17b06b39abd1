"""`python -m apphosting_cli`: the `apphosting` command without its console script."""

import sys

from apphosting_cli.main import main

sys.exit(main())
