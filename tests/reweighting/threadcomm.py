"""The reweighting tests use the shared thread harness as it is (exceptions re-raised)."""
from tests.threadcomm import ThreadComm, _Shared, run_threads  # noqa: F401
