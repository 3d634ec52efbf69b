"""Small file operations on `run_dir`, which is a local path (on a volume every node
mounts) or an fsspec URL (s3://, gs://, memory://...): one code path for both."""
from __future__ import annotations

import posixpath

import fsspec


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def read_text(url: str) -> str | None:
    """The file's text, or None when it does not exist."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return fs.cat_file(path).decode()
    except FileNotFoundError:
        return None


def write_text(url: str, text: str) -> None:
    from distreg.runtime.checkpoint import write_bytes_atomic

    write_bytes_atomic(url, text.encode())


def append_text(url: str, text: str) -> None:
    """Append (object stores rewrite the object: fine for the small, rare records here)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "ab") as f:
        f.write(text.encode())


def remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
