"""A real text corpus on every machine without a download: the Python standard
library's own source files (`distreg data stdlib-corpus OUT`).

The `.py` files under `sysconfig.get_paths()["stdlib"]` (no site-packages; test packages
only with `with_tests`) are split into train and val **by file**: a file goes to val
when the first 8 bytes of sha256(relative path) read as a fraction fall below
`val_fraction`, so the split is deterministic, needs no seed, and a file keeps its split
when others are added or removed. Each split is written as JSON lines (one document =
one file, in sorted path order) and tokenized by `distreg data tokenize`
(`tokenize_corpus`): `bytes`, or a byte-level BPE trained with `tokenizers` on the
train split only (the val files never influence the vocabulary).

OUT/
  corpus.json          Python version, source root, tokenizer, the files of each split
  text/<split>/*.jsonl the documents
  tokenizer.json       (bpe only)
  train/, val/         token datasets (index.json + shards): data.path for training / eval
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import sys
import sysconfig
from pathlib import Path

import fsspec

from distreg.data.errors import DataError

TEST_DIRS = {"test", "tests", "idle_test"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
PART_BYTES = 4 * 2**20  # documents per jsonl part: tokenize's parallel tasks cut at file boundaries
EOS = "<|endoftext|>"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str, include: list[str] | None = None, with_tests: bool = False) -> list[str]:
    """Sorted relative posix paths of the `.py` files under `root` (matching `include`
    globs if given); site-packages (and test packages) are pruned, not walked."""
    skip = SKIP_DIRS | (set() if with_tests else TEST_DIRS)
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        rel_folder = Path(folder).relative_to(root).as_posix()
        for name in names:
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            if name.endswith(".py") and (not include or any(fnmatch.fnmatch(rel, p) for p in include)):
                out.append(rel)
    return sorted(out)


def is_val(rel_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_files(files: list[str], val_fraction: float) -> dict[str, list[str]]:
    split = {"train": [f for f in files if not is_val(f, val_fraction)],
             "val": [f for f in files if is_val(f, val_fraction)]}
    if not split["train"] or not split["val"]:
        raise DataError(f"stdlib-corpus: {len(files)} files and val fraction {val_fraction} leave an empty split")
    return split


def _read(root: str, rel: str) -> str:
    # A few stdlib files are not UTF-8 (test data): replace, never skip, so the split is what was listed.
    return Path(root, rel).read_bytes().decode("utf-8", errors="replace")


def _write_jsonl(fs, folder: str, root: str, files: list[str]) -> None:
    fs.makedirs(folder, exist_ok=True)
    part, size, n = [], 0, 0

    def flush() -> None:
        nonlocal part, size, n
        fs.pipe_file(posixpath.join(folder, f"part-{n:05d}.jsonl"), "".join(part).encode())
        part, size, n = [], 0, n + 1

    for rel in files:
        line = json.dumps({"text": _read(root, rel), "path": rel}) + "\n"
        part.append(line)
        size += len(line)
        if size >= PART_BYTES:
            flush()
    if part:
        flush()


def train_bpe(root: str, files: list[str], vocab_size: int, out_path: str) -> None:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on `files` only, with
    `<|endoftext|>` as its end-of-sequence token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_read(root, rel) for rel in files), trainer=trainer, length=len(files))
    with fsspec.open(out_path, "w", encoding="utf-8") as f:
        f.write(tok.to_str())


def build_stdlib_corpus(out: str, tokenizer: str = "bytes", val_fraction: float = 0.1, vocab_size: int = 4096,
                        include: list[str] | None = None, with_tests: bool = False, source: str | None = None,
                        processes: int = 1) -> dict:
    """Write the corpus under `out` (path or fsspec URL); returns corpus.json's content
    plus each split's tokenize summary. Same Python, same arguments -> same bytes."""
    from distreg.data.tokenize import tokenize_corpus

    if tokenizer not in ("bytes", "bpe"):
        raise DataError(f"stdlib-corpus: --tokenizer must be bytes or bpe, not {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise DataError(f"stdlib-corpus: --val-fraction must be in (0, 1), not {val_fraction}")
    root = source or stdlib_root()
    if not Path(root).is_dir():
        raise DataError(f"stdlib-corpus: source {root} is not a directory")
    files = list_files(root, include, with_tests)
    if not files:
        raise DataError(f"stdlib-corpus: no .py files under {root}" + (f" matching {include}" if include else ""))
    splits = split_files(files, val_fraction)
    fs, base = fsspec.core.url_to_fs(out)
    base = base.rstrip("/")
    out = out.rstrip("/")
    for name, names in splits.items():
        _write_jsonl(fs, posixpath.join(base, "text", name), root, names)
    spec = "bytes"
    if tokenizer == "bpe":
        spec = f"{out}/tokenizer.json"
        train_bpe(root, splits["train"], vocab_size, spec)
    summaries = {name: tokenize_corpus(f"{out}/text/{name}", f"{out}/{name}", tokenizer=spec, eos_token=None
                                       if tokenizer == "bytes" else EOS, processes=processes)
                 for name in splits}
    corpus = {"source": "python-stdlib", "python": sys.version.split()[0], "root": root, "tokenizer": tokenizer,
              "vocab_size": summaries["train"]["vocab_size"], "val_fraction": val_fraction,
              "files": splits,
              "tokens": {name: s["num_tokens"] for name, s in summaries.items()}}
    fs.pipe_file(posixpath.join(base, "corpus.json"), json.dumps(corpus, indent=1).encode())
    return {**corpus, "summaries": summaries}


def add_command(sub, wrap=lambda fn: fn) -> None:
    """The `distreg data stdlib-corpus` parser; `wrap` turns a DataError into a one-line exit."""
    p = sub.add_parser("stdlib-corpus", help="a real corpus offline: the Python standard library's sources, "
                                             "split train/val by file and tokenized")
    p.add_argument("out", help="output directory or fsspec URL (OUT/train, OUT/val: token datasets)")
    p.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes",
                   help="bytes (vocab 257) or a byte-level BPE trained on the train split")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of files held out (by path hash)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="only files matching this glob relative to the stdlib root (repeatable), e.g. 'json/*.py'")
    p.add_argument("--with-tests", action="store_true", help="include the stdlib's test packages")
    p.add_argument("--source", default=None, help="another source tree instead of the stdlib")
    p.add_argument("--processes", type=int, default=1)
    p.set_defaults(fn=wrap(_command))


def _command(args) -> int:
    c = build_stdlib_corpus(args.out, args.tokenizer, args.val_fraction, args.vocab_size, args.include,
                            args.with_tests, args.source, args.processes)
    print(f"{args.out}: Python {c['python']} stdlib, {len(c['files']['train'])} train / {len(c['files']['val'])} "
          f"val files, {c['tokens']['train']} / {c['tokens']['val']} tokens ({c['tokenizer']}, vocab "
          f"{c['vocab_size']}); train with --set data.path={args.out}/train --set model.vocab_size={c['vocab_size']}")
    return 0
