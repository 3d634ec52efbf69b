"""Text corpora -> token shards in the `tokens.py` format (`distreg data tokenize`).

Input: `.txt` files (one document each) and `.jsonl` files (one JSON document per line,
text under `text_key`), optionally compressed (`.gz`, `.bz2`, `.xz`, `.zst`: fsspec
infers it), given as a file, a directory (searched recursively) or a glob, local or
any fsspec URL. Every document is followed by the tokenizer's end-of-sequence id.

The tokenizer is a Hugging Face `tokenizer.json` (the `tokenizers` package) or
`bytes`: UTF-8 bytes 0-255 with EOS = 256 (vocab 257), which needs no file.

Parallel and deterministic: input files are cut, in sorted order, into tasks of
about `task_bytes`; each task runs in its own process and writes its own shards
(at most `shard_tokens` tokens each), and `index.json` lists them in task order. The
output is therefore the same for any number of processes. `index.json` (written
last) records per-shard token counts and checksums, the tokenizer, EOS id and
document count.
"""
from __future__ import annotations

import json
import multiprocessing
import posixpath
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np

from distreg.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as token ids, EOS = 256: works on any text, no vocabulary file."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (local path or fsspec URL)."""

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer

        with fsspec.open(path, "r", encoding="utf-8") as f:
            self.tok = Tokenizer.from_str(f.read())
        self.name = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        for token in ([eos_token] if eos_token else EOS_CANDIDATES):
            eos = self.tok.token_to_id(token)
            if eos is not None:
                self.eos_id = eos
                break
        else:
            raise DataError(f"{path}: no end-of-sequence token among {list(EOS_CANDIDATES)}; pass --eos-token"
                            if not eos_token else f"{path}: --eos-token {eos_token!r} is not in the vocabulary")

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]


def load_tokenizer(spec: str, eos_token: str | None = None):
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec, eos_token)


def list_inputs(src: str) -> list[str]:
    """The text files of `src` (a file, a directory or a glob), sorted, as full URLs."""
    fs, path = fsspec.core.url_to_fs(src)
    if fs.isdir(path):
        files = fs.find(path)
    elif any(c in path for c in "*?["):
        files = fs.glob(path)
    elif fs.exists(path):
        files = [path]
    else:
        raise DataError(f"tokenize: {src} does not exist")

    def is_text(p: str) -> bool:
        for c in COMPRESSIONS:
            p = p.removesuffix(c)
        return p.endswith(TEXT_SUFFIXES)

    files = sorted(f for f in files if is_text(f))
    if not files:
        raise DataError(f"tokenize: no {'/'.join(TEXT_SUFFIXES)} files under {src}")
    return [fs.unstrip_protocol(f) for f in files]


def documents(url: str, text_key: str):
    """Yield the documents of one input file."""
    base = url
    for c in COMPRESSIONS:
        base = base.removesuffix(c)
    with fsspec.open(url, "rt", encoding="utf-8", compression="infer") as f:
        if base.endswith(".txt"):
            yield f.read()
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{url}: line {n}: not a JSON object with a {text_key!r} string ({e})") from None


@dataclass
class Task:
    number: int
    files: list[str]
    dest: str
    tokenizer: str
    eos_token: str | None
    text_key: str
    shard_tokens: int
    batch_docs: int = 256


def run_task(task: Task) -> dict:
    """Tokenize the task's files into shards `shard_<task>_<part>.bin`; returns
    {"shards": [index entries], "documents": n}. Runs in a worker process."""
    from distreg.data.token_format import dtype_for_vocab, write_shard

    tok = load_tokenizer(task.tokenizer, task.eos_token)
    dtype = dtype_for_vocab(tok.vocab_size)
    fs, root = fsspec.core.url_to_fs(task.dest)
    shards, pending, pending_n, docs = [], [], 0, 0
    eos = np.array([tok.eos_id], dtype=np.uint32)

    def flush(final: bool) -> None:
        nonlocal pending, pending_n
        if pending_n == 0:
            return
        arr = np.concatenate(pending)
        while arr.size >= task.shard_tokens or (final and arr.size):
            piece, arr = arr[: task.shard_tokens], arr[task.shard_tokens :]
            path = posixpath.join(root, f"shard_{task.number:05d}_{len(shards):04d}.bin")
            shards.append(write_shard(fs, path, piece, tok.vocab_size, dtype))
        pending, pending_n = ([arr], int(arr.size)) if arr.size else ([], 0)

    def encode(batch: list[str]) -> None:
        nonlocal pending_n
        for ids in tok.encode(batch):
            pending.extend((ids, eos))
            pending_n += ids.size + 1
        if pending_n >= task.shard_tokens:
            flush(final=False)

    for url in task.files:
        batch: list[str] = []
        for doc in documents(url, task.text_key):
            batch.append(doc)
            docs += 1
            if len(batch) == task.batch_docs:
                encode(batch)
                batch = []
        if batch:
            encode(batch)
    flush(final=True)
    return {"shards": shards, "documents": docs}


def tokenize_corpus(src: str, dest: str, tokenizer: str = "bytes", eos_token: str | None = None, text_key: str = "text",
                    shard_tokens: int = 2**27, task_bytes: int = 256 * 2**20, processes: int = 1) -> dict:
    """Tokenize `src` into a token dataset at `dest`; returns the index summary.
    `processes > 1` runs tasks in spawned processes (a `memory://` destination is per
    process, so use 1 for it)."""
    files = list_inputs(src)
    tok = load_tokenizer(tokenizer, eos_token)  # fail here, not in a worker, on a bad tokenizer
    fs, root = fsspec.core.url_to_fs(src)
    sizes = [fs.size(fsspec.core.url_to_fs(f)[1]) or 0 for f in files]
    groups, current, current_bytes = [], [], 0
    for f, size in zip(files, sizes):
        if current and current_bytes + size > task_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(f)
        current_bytes += size
    groups.append(current)
    dfs, droot = fsspec.core.url_to_fs(dest)
    dfs.makedirs(droot, exist_ok=True)
    tasks = [Task(i, g, dest, tokenizer, eos_token, text_key, shard_tokens) for i, g in enumerate(groups)]
    if processes > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_task, tasks))
    else:
        results = [run_task(t) for t in tasks]
    shards = [s for r in results for s in r["shards"]]
    if not shards:
        raise DataError(f"tokenize: {src} holds no text")
    from distreg.data.token_format import write_index

    summary = {"num_tokens": sum(s["num_tokens"] for s in shards), "num_documents": sum(r["documents"] for r in results),
               "tokenizer": tok.name, "eos_id": tok.eos_id, "sources": files}
    write_index(dest, shards, tok.vocab_size, **summary)
    return {**summary, "num_shards": len(shards), "vocab_size": tok.vocab_size}
