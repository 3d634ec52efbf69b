"""The sparsity tests' view of the shared thread harness: exceptions come back per rank."""
from __future__ import annotations

import functools

from tests.threadcomm import NoComm, ThreadComm, _Shared  # noqa: F401
from tests.threadcomm import run_threads as _run_threads

run_threads = functools.partial(_run_threads, return_exceptions=True)
