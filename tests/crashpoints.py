"""Kill a process at a chosen point inside a collection write, the way a power cut or SIGKILL would
(os._exit: no cleanup, no finally blocks), by wrapping the production functions that mark the point.
Production code carries no hook; a test child process calls `install(spec)` before it writes.

Points (spec "<point>[:<nth>]": the nth time the point is reached, default the first):
  before_commit    rows inserted inside the transaction, before COMMIT (db.insert_batch returned)
  after_commit     the transaction committed, the in-memory index not yet updated (db.write_batch returned)
  during_snapshot  an index snapshot's temp file complete, not yet renamed over the target

Run a command under a crash point: `python tests/crashpoints.py SPEC -m clipforge ARGS...`.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys

EXIT_CODE = 77


def install(spec: str) -> None:
    from clipforge import atomic
    from clipforge.index import db

    point, _, nth = spec.partition(":")
    count = [0]

    def reached() -> None:
        count[0] += 1
        if count[0] >= int(nth or 1):
            os._exit(EXIT_CODE)

    def after(fn, when=lambda *a, **k: True):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if when(*args, **kwargs):
                reached()
            return out

        return wrapper

    if point == "before_commit":
        db.insert_batch = after(db.insert_batch)
    elif point == "after_commit":
        db.write_batch = after(db.write_batch)
    elif point == "during_snapshot":
        replace = atomic.os.replace

        class _Os:  # clipforge.atomic's view of `os`, renaming a finished snapshot temp file only after we die
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if str(dst).endswith(".faiss"):
                    reached()
                return replace(src, dst)

        atomic.os = _Os()
    else:
        raise ValueError(f"unknown crash point {point!r}")


if __name__ == "__main__":  # python crashpoints.py SPEC -m module args...
    install(sys.argv[1])
    assert sys.argv[2] == "-m", "usage: crashpoints.py SPEC -m MODULE ARGS..."
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
