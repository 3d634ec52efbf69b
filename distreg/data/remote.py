"""Ranged reads from object storage with a bounded read-ahead and an optional local
disk cache with a size limit (token and image readers, `data.remote`).

Why not fsspec's own caches: `blockcache::`/`simplecache::` keep whole blocks or files
with no size limit, and fsspec reads are synchronous. The readers know their future
reads exactly (the sample order is a seeded permutation), so they submit the byte
ranges of the next steps to a small thread pool: at most `max_in_flight` requests are
outstanding, and at most `readahead_steps` steps of data are held, so memory is bounded
and a rank waits on a request only when storage is slower than the model.

The disk cache (`cache_dir`, `cache_bytes`) keeps fetched ranges as files, least
recently used evicted first; each rank gets its own subdirectory (ranks never share
files), and a cache survives a restart of the process (it is an index of what is on
disk, rebuilt from the directory).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from fsspec.implementations.local import LocalFileSystem


def is_remote(fs) -> bool:
    return not isinstance(fs, LocalFileSystem)


class DiskCache:
    """Byte ranges on local disk, at most `max_bytes` in total (LRU eviction)."""

    def __init__(self, directory: str, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()
        files = [(os.path.getmtime(p), name, os.path.getsize(p))
                 for name in os.listdir(directory) if not name.endswith(".tmp")
                 for p in [os.path.join(directory, name)]]
        for _, name, size in sorted(files):
            self._entries[name] = size
        self.size = sum(self._entries.values())

    @staticmethod
    def key(path: str, start: int, end: int) -> str:
        return hashlib.sha1(f"{path}:{start}:{end}".encode()).hexdigest()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
        try:
            with open(os.path.join(self.dir, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        tmp = os.path.join(self.dir, f"{key}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.dir, key))
        with self._lock:
            self.size += len(data) - self._entries.pop(key, 0)
            self._entries[key] = len(data)
            while self.size > self.max_bytes and self._entries:
                old, n = self._entries.popitem(last=False)
                self.size -= n
                try:
                    os.remove(os.path.join(self.dir, old))
                except FileNotFoundError:
                    pass


class RangeReader:
    """Ranged reads of one fsspec filesystem: `submit` returns a future (at most
    `max_in_flight` requests run at once), `read` waits for one."""

    def __init__(self, fs, max_in_flight: int = 8, cache_dir: str | None = None, cache_bytes: int = 0):
        self.fs = fs
        self.max_in_flight = max_in_flight
        self.cache = DiskCache(cache_dir, cache_bytes) if cache_dir and cache_bytes > 0 else None
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self.requests = 0  # storage requests made (cache misses)
        self._count_lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        # Per process: a forked dataloader worker must not inherit the parent's threads.
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="distreg-read")
            self._pid = os.getpid()
        return self._pool

    def _fetch(self, path: str, start: int, end: int) -> bytes:
        key = DiskCache.key(path, start, end) if self.cache else None
        if key is not None:
            data = self.cache.get(key)
            if data is not None and len(data) == end - start:
                return data
        data = self.fs.cat_file(path, start=start, end=end)
        with self._count_lock:
            self.requests += 1
        if key is not None and len(data) == end - start:
            self.cache.put(key, data)
        return data

    def submit(self, path: str, start: int, end: int) -> Future:
        return self._executor().submit(self._fetch, path, start, end)

    def read(self, path: str, start: int, end: int) -> bytes:
        return self._fetch(path, start, end)

    def close(self) -> None:
        """Drop queued read-ahead and wait for the requests already running."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # threads do not travel to dataloader workers
        state["_count_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._count_lock = threading.Lock()
