"""Writing token datasets (the `tokens.py` on-disk format), without importing torch:
the tokenizer's worker processes use it and should start in a fraction of a second."""
from __future__ import annotations

import hashlib
import json
import posixpath

import fsspec
import numpy as np

FORMAT = "distreg-tokens/1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_token_shards(url: str, token_arrays: list[np.ndarray], vocab_size: int) -> None:
    """Write one shard per array plus `index.json` (written last, so a half-written
    dataset has no index and is refused rather than read short)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    shards = []
    for i, arr in enumerate(token_arrays):
        name = f"shard_{i:05d}.bin"
        shards.append(write_shard(fs, posixpath.join(root, name), arr, vocab_size, dtype))
    write_index(url, shards, vocab_size)


def write_shard(fs, path: str, tokens: np.ndarray, vocab_size: int, dtype: str) -> dict:
    """Write one shard file; returns its index entry {"file", "num_tokens", "sha256"}."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{path}: token ids outside [0, {vocab_size})")
    from distreg.data.convert_run import atomic_write

    data = np.asarray(tokens, dtype=_DTYPES[dtype]).tobytes()
    atomic_write(fs, path, data)
    return {"file": posixpath.basename(path), "num_tokens": int(tokens.size), "sha256": hashlib.sha256(data).hexdigest()}


def write_index(url: str, shards: list[dict], vocab_size: int, missing: list[str] | None = None, **extra) -> None:
    """`index.json` (the dataset's manifest) for shards already written (`extra`: more
    top-level fields, e.g. the tokenizer and document counts; readers ignore what they
    do not know). `missing` (shards not yet written) marks the dataset incomplete:
    readers refuse it, naming them. Written atomically."""
    from distreg.data.convert_run import atomic_write

    fs, root = fsspec.core.url_to_fs(url)
    index = {"format": FORMAT, "dtype": dtype_for_vocab(vocab_size), "vocab_size": vocab_size,
             "complete": not missing, **({"missing": missing} if missing else {}), "shards": shards, **extra}
    atomic_write(fs, posixpath.join(root, "index.json"), json.dumps(index, indent=1).encode())
