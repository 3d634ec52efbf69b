"""The one exception of the data layer (kept free of heavy imports: converter worker
processes import it without loading torch)."""
from __future__ import annotations


class DataError(RuntimeError):
    """Bad or missing data; the message names the path or shard (and member/offset)."""
