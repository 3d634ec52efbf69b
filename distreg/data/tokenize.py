"""Text corpora -> token shards in the `tokens.py` format (`distreg data tokenize`).

Input: `.txt` files (one document each) and `.jsonl` files (one JSON document per line,
text under `text_key`), optionally compressed (`.gz`, `.bz2`, `.xz`, `.zst`: fsspec
infers it), given as a file, a directory (searched recursively) or a glob, local or
any fsspec URL. Every document is followed by the tokenizer's end-of-sequence id.

The tokenizer is a Hugging Face `tokenizer.json` (the `tokenizers` package) or
`bytes`: UTF-8 bytes 0-255 with EOS = 256 (vocab 257), which needs no file.

Parallel and deterministic: input files are cut, in sorted order, into tasks of
about `task_bytes`; each task (in this process, a process pool, or a Ray task on any
node: `convert_run`) writes its own shards (at most `shard_tokens` tokens each,
atomically) and then its record `_parts/task_NNNNN.json`; `index.json` lists the
shards in task order. The output is therefore the same for any number of workers.

Restartable: a re-run skips every task whose record matches the plan (input files and
sizes, tokenizer content, settings) and whose shards have the recorded sizes (and
checksums, with `verify`). `index.json` is the manifest: written first as incomplete
(`"complete": false`, `"missing"`: the shards not yet written), rewritten at the end
with per-shard token counts and sha256, tokenizer, EOS id and document count.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
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


def list_inputs(src: str, sizes: dict[str, int] | None = None) -> list[str]:
    """The text files of `src` (a file, a directory or a glob), sorted, as full URLs;
    their sizes go into `sizes` (from the listing: no request per file)."""
    fs, path = fsspec.core.url_to_fs(src)
    if fs.isdir(path):
        found = fs.find(path, detail=True)
    elif any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
    elif fs.exists(path):
        found = {path: fs.info(path)}
    else:
        raise DataError(f"tokenize: {src} does not exist")

    def is_text(p: str) -> bool:
        for c in COMPRESSIONS:
            p = p.removesuffix(c)
        return p.endswith(TEXT_SUFFIXES)

    files = sorted(f for f, info in found.items() if is_text(f) and info.get("type") != "directory")
    if not files:
        raise DataError(f"tokenize: no {'/'.join(TEXT_SUFFIXES)} files under {src}")
    if sizes is not None:
        sizes.update({fs.unstrip_protocol(f): int(found[f].get("size") or 0) for f in files})
    return [fs.unstrip_protocol(f) for f in files]


def documents(url: str, text_key: str):
    """Yield the documents of one input file."""
    base = url
    for c in COMPRESSIONS:
        base = base.removesuffix(c)
    if base == url and base.endswith(".txt"):  # one GET, no HEAD: object stores charge per request
        fs, path = fsspec.core.url_to_fs(url)
        yield fs.cat_file(path).decode("utf-8")
        return
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
    sizes: list[int]
    dest: str
    tokenizer: str
    eos_token: str | None
    text_key: str
    shard_tokens: int
    tokenizer_sha: str = ""  # content hash of tokenizer.json: a changed file changes the plan
    batch_docs: int = 256

    @property
    def prefix(self) -> str:
        return f"shard_{self.number:05d}_"

    @property
    def plan_sha(self) -> str:
        """What the task's output depends on; a record with another plan is redone."""
        plan = [self.number, [(f, n) for f, n in zip(self.files, self.sizes)], self.tokenizer_sha or self.tokenizer,
                self.eos_token, self.text_key, self.shard_tokens]
        return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def _record_path(root: str, number: int) -> str:
    return posixpath.join(root, "_parts", f"task_{number:05d}.json")


def run_task(task: Task) -> dict:
    """Tokenize the task's files into shards `shard_<task>_<part>.bin`, then write the
    task's completion record; returns it: {"shards": [index entries], "documents": n,
    "plan_sha"}. Runs in a worker process or Ray task; a retry rewrites the same bytes."""
    from distreg.data.convert_run import atomic_write
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
            path = posixpath.join(root, f"{task.prefix}{len(shards):04d}.bin")
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
    record = {"task": task.number, "plan_sha": task.plan_sha, "dtype": dtype, "shards": shards, "documents": docs}
    atomic_write(fs, _record_path(root, task.number), json.dumps(record).encode())  # last: marks the task complete
    return record


def _complete(fs, root: str, task: Task, verify: bool) -> dict | None:
    """The task's record if it was completed by an earlier run with the same plan and
    its shards are all there with the recorded size (and checksum with `verify`)."""
    try:
        record = json.loads(fs.cat_file(_record_path(root, task.number)))
    except FileNotFoundError:
        return None
    if record.get("plan_sha") != task.plan_sha:
        return None
    for s in record["shards"]:
        path = posixpath.join(root, s["file"])
        try:
            if fs.size(path) != s["num_tokens"] * (2 if record["dtype"] == "uint16" else 4):
                return None
        except FileNotFoundError:
            return None
        if verify and hashlib.sha256(fs.cat_file(path)).hexdigest() != s["sha256"]:
            return None
    return record


def plan_tasks(src: str, dest: str, tokenizer: str, eos_token: str | None, text_key: str, shard_tokens: int,
               task_bytes: int) -> tuple[list[str], list[Task]]:
    """Input files (sorted) cut into tasks of about `task_bytes`, in order."""
    size_of: dict[str, int] = {}
    files = list_inputs(src, size_of)
    sizes = [size_of[f] for f in files]
    tok_sha = ""
    if tokenizer != "bytes":
        with fsspec.open(tokenizer, "rb") as f:
            tok_sha = hashlib.sha256(f.read()).hexdigest()
    groups: list[list[int]] = [[]]
    group_bytes = 0
    for k, size in enumerate(sizes):
        if groups[-1] and group_bytes + size > task_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(k)
        group_bytes += size
    tasks = [Task(i, [files[k] for k in g], [sizes[k] for k in g], dest, tokenizer, eos_token, text_key,
                  shard_tokens, tok_sha) for i, g in enumerate(groups)]
    return files, tasks


def tokenize_corpus(src: str, dest: str, tokenizer: str = "bytes", eos_token: str | None = None, text_key: str = "text",
                    shard_tokens: int = 2**27, task_bytes: int = 256 * 2**20, processes: int = 1,
                    ray: bool = False, max_in_flight: int | None = None, verify: bool = False,
                    mlflow_uri: str | None = None, progress_every: float = 10.0) -> dict:
    """Tokenize `src` into a token dataset at `dest`; returns the index summary plus
    {"written": tasks run, "skipped": tasks found complete, "nodes": tasks per node}.

    Restartable: tasks completed by an earlier run with the same plan are skipped.
    `processes > 1` runs tasks in spawned processes, `ray=True` as Ray tasks over the
    cluster (a `memory://` destination is per process: use neither for it)."""
    from distreg.data.convert_run import Progress, run_tasks
    from distreg.data.token_format import write_index

    tok = load_tokenizer(tokenizer, eos_token)  # fail here, not in a worker, on a bad tokenizer
    files, tasks = plan_tasks(src, dest, tokenizer, eos_token, text_key, shard_tokens, task_bytes)
    dfs, droot = fsspec.core.url_to_fs(dest)
    droot = droot.rstrip("/")
    dfs.makedirs(posixpath.join(droot, "_parts"), exist_ok=True)
    records: list[dict | None] = [_complete(dfs, droot, t, verify) for t in tasks]
    todo = [t for t, r in zip(tasks, records) if r is None]
    meta = {"tokenizer": tok.name, "eos_id": tok.eos_id, "sources": files}
    # The manifest says "incomplete" until every task is done: a reader (or `distreg
    # train`) meeting a half-converted dataset refuses it and names what is missing.
    write_index(dest, [s for r in records if r for s in r["shards"]], tok.vocab_size,
                missing=[f"{t.prefix}*.bin" for t in todo] or None, **meta)
    progress = Progress(f"tokenize {dest}", "tokens", len(files), sum(sum(t.sizes) for t in tasks),
                        every=progress_every, mlflow_uri=mlflow_uri)
    progress.skip(sum(len(t.files) for t, r in zip(tasks, records) if r),
                  sum(sum(t.sizes) for t, r in zip(tasks, records) if r), 0)
    nodes: dict[str, int] = {}
    status = "FAILED"
    try:
        for i, record, where in run_tasks(run_task, todo, "ray" if ray else "local", processes, max_in_flight):
            t = todo[i]
            records[t.number] = record
            nodes[where] = nodes.get(where, 0) + 1
            progress.add(len(t.files), sum(t.sizes), sum(s["num_tokens"] for s in record["shards"]))
        status = "FINISHED"
    finally:
        progress.close(status)
    shards = [s for r in records for s in r["shards"]]
    if not shards:
        raise DataError(f"tokenize: {src} holds no text")
    summary = {"num_tokens": sum(s["num_tokens"] for s in shards), "num_documents": sum(r["documents"] for r in records),
               **meta}
    write_index(dest, shards, tok.vocab_size, **summary)
    _remove_stale(dfs, droot, {s["file"] for s in shards}, len(tasks))
    return {**summary, "num_shards": len(shards), "vocab_size": tok.vocab_size, "written": len(todo),
            "skipped": len(tasks) - len(todo), "written_tasks": [t.number for t in todo], "nodes": nodes}


def _remove_stale(fs, root: str, keep: set[str], num_tasks: int) -> None:
    """Shards and records of an earlier plan that this one no longer has."""
    for path in (fs.glob(posixpath.join(root, "shard_*.bin")) + fs.glob(posixpath.join(root, "*.tmp-*"))
                 + fs.glob(posixpath.join(root, "_parts", "*.tmp-*"))):
        if posixpath.basename(path) not in keep:  # incl. temporaries of writes a crash interrupted
            fs.rm(path)
    for path in fs.glob(posixpath.join(root, "_parts", "task_*.json")):
        if int(posixpath.basename(path)[5:10]) >= num_tasks:
            fs.rm(path)
