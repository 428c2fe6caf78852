"""Time one command as a fresh process: wall seconds of the command alone and the peak RSS of its largest process.

A small wrapper process starts the command, times only it, and reads ``RUSAGE_CHILDREN``'s
``ru_maxrss``: the peak resident memory of the largest process among the command and its
waited-for children (medpipe's main process or one of its workers). The command's standard
output is discarded; its standard error comes back for error messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence

_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "wall = time.perf_counter() - start\n"
    "print(json.dumps({'rc': rc, 'wall': wall, 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def timed(command: Sequence[str], *, env: Mapping[str, str] | None = None, ok: Sequence[int] = (0,)) -> dict:
    """Run ``command``: {'rc': exit status, 'wall': seconds, 'rss_kb': largest process peak, 'stderr': text};
    SystemExit, with the end of its standard error, when it exits with a status not in ``ok``."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True,
                          env=dict(env) if env is not None else None)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"timing {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}
    if result["rc"] not in ok:
        raise SystemExit(f"{' '.join(command)} exited with status {result['rc']}:\n{done.stderr[-3000:]}")
    return result
