"""A torchrun worker for tests/test_launch.py that ignores SIGINT, SIGTERM and SIGUSR1 (as a
rank stuck in native code would), so only SIGKILL stops it."""

import signal
import sys
import time

signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
print("stubborn worker ready", file=sys.stderr, flush=True)
time.sleep(120)
