"""Starts a command that ends with the process that asked for it: `python orphan_guard.py PARENT_PID COMMAND ...`.

Run as a script between fork and the command's exec, instead of a preexec_fn: code run in the
child of a multi-threaded parent before exec can crash on a lock another thread held at fork.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# prctl(2): the signal this process gets when the thread that started it ends; it survives exec.
_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, command = int(argv[1]), argv[2:]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died before prctl: then no signal would ever come.
        if os.getppid() != parent:
            sys.exit(0)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv)
