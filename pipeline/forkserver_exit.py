"""Preloaded last in medpipe's forkserver: the server then ends without tearing torch and MONAI down.

The forkserver that torch-using workers fork from (see :mod:`pipeline.isolation`) exits when
the command does. Its interpreter's teardown of torch and MONAI takes 1-1.5 s of CPU on this
machine after every such command (holding the command's output pipes open meanwhile). The
server has nothing to flush, so its exit skips that teardown. Imported anywhere but inside
``multiprocessing.forkserver.main`` this module does nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
from multiprocessing import forkserver


def _inside_forkserver() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if _inside_forkserver():
    atexit.register(os._exit, 0)
