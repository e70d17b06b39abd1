"""The fakes as a cluster of their own: `python -m tests.k8s.serve_fakes KUBECONFIG` serves the fake API server
with its controller loop, writes its kubeconfig to KUBECONFIG and runs until interrupted.

With APPHOSTING_TEST_KUBECONFIG=KUBECONFIG the driver tests run as they do on a real cluster: through
the kubeconfig only, the fakes' hooks out of reach (tests marked `fake_only` skip). It checks the
real-cluster path of the tests where no cluster is at hand.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tests.k8s.conftest import start_fakes


def main(kubeconfig: str) -> None:
    server, controllers = start_fakes()
    server.write_kubeconfig(Path(kubeconfig))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"serving {server.url}; kubeconfig in {kubeconfig}", flush=True)
    stop.wait()
    controllers.stop()
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1])
