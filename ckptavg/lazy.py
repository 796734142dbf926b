"""torch, imported only when a command needs it (`import_torch`, the one place the package
imports torch on demand): `--help`, and the averaging of safetensors and torch files, never
import it. In the main thread Ctrl-C and SIGTERM are held off during the import (a signal
landing inside torch's C++ initialisation aborts the interpreter, exit -6) and raised once
it is done. A root module, so that every layer (io, parallel, nn) imports it from below."""

from __future__ import annotations

import signal
import sys
import threading
from types import ModuleType


def import_torch() -> ModuleType:
    """torch, imported now if it was not, with Ctrl-C and SIGTERM held off during the import
    (in the main thread; elsewhere signals are not delivered to the importing thread)."""
    if "torch" in sys.modules and hasattr(sys.modules["torch"], "dtype"):
        return sys.modules["torch"]
    if threading.current_thread() is not threading.main_thread():
        import torch
        return torch
    held: list[int] = []
    # A signal the process ignores (a background job's SIGINT) stays ignored.
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        import torch
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGINT in held:
        raise KeyboardInterrupt
    if signal.SIGTERM in held:
        raise SystemExit(128 + signal.SIGTERM)
    return torch
