"""The offline real corpus: Python stdlib sources split train/val by file, tokenized by
`distreg data tokenize` (bytes, or a BPE trained on the train split only)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distreg.data.errors import DataError
from distreg.data.stdlib_corpus import build_stdlib_corpus, is_val, list_files, stdlib_root

SUBSET = ["json/*.py", "email/mime/*.py", "collections/*.py"]


def read_tokens(dataset: str) -> np.ndarray:
    index = json.load(open(os.path.join(dataset, "index.json")))
    return np.concatenate([np.fromfile(os.path.join(dataset, s["file"]), dtype=np.dtype(index["dtype"]))
                           for s in index["shards"]])


def test_bytes_corpus_split_by_file_and_deterministic(tmp_path):
    out = str(tmp_path / "a")
    c = build_stdlib_corpus(out, "bytes", val_fraction=0.3, include=SUBSET)
    files = list_files(stdlib_root(), SUBSET)
    assert files and "json/decoder.py" in files
    assert sorted(c["files"]["train"] + c["files"]["val"]) == files
    assert not set(c["files"]["train"]) & set(c["files"]["val"])
    assert c["files"]["val"] == [f for f in files if is_val(f, 0.3)] and c["files"]["val"]
    # val tokens = each val file's UTF-8 bytes followed by EOS (256), in sorted path order.
    expected = []
    for rel in c["files"]["val"]:
        expected += [*open(os.path.join(stdlib_root(), rel), "rb").read(), 256]
    assert read_tokens(f"{out}/val").tolist() == expected
    assert c["tokens"]["train"] == sum(os.path.getsize(os.path.join(stdlib_root(), f)) + 1 for f in c["files"]["train"])
    # Same Python, same arguments: the same datasets, byte for byte.
    again = build_stdlib_corpus(str(tmp_path / "b"), "bytes", val_fraction=0.3, include=SUBSET)
    for split in ("train", "val"):
        first, second = (json.load(open(f"{d}/{split}/index.json")) for d in (out, str(tmp_path / "b")))
        assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    assert again["files"] == c["files"]


def test_bpe_is_trained_on_train_files_only(tmp_path):
    from tokenizers import Tokenizer

    # A source tree whose val files hold a string the train files never contain.
    src = tmp_path / "src"
    src.mkdir()
    names = [f"mod{i}.py" for i in range(12)]
    val = [n for n in names if is_val(n, 0.25)]
    assert val and len(val) < len(names)
    for n in names:
        text = "QQQQQQQQQQQQ = 'qqqqqqqqqqqqqqqq'\n" * 50 if n in val else f"def f{n[3:-3]}(x):\n    return x + 1\n" * 40
        (src / n).write_text(text)
    out = str(tmp_path / "bpe")
    c = build_stdlib_corpus(out, "bpe", val_fraction=0.25, vocab_size=300, source=str(src))
    assert c["files"]["val"] == val
    tok = Tokenizer.from_file(f"{out}/tokenizer.json")
    assert not [t for t in tok.get_vocab() if "QQ" in t or "qq" in t]  # no merge learned from val
    assert any("return" in t for t in tok.get_vocab())  # merges learned from train
    eos = tok.token_to_id("<|endoftext|>")
    ids = read_tokens(f"{out}/val").tolist()
    assert ids.count(eos) == len(val)
    # Byte-level BPE is lossless: the val split decodes back to its files.
    docs, current = [], []
    for i in ids:
        if i == eos:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    assert docs == [(src / n).read_text() for n in val]


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no .py files .* matching"):
        build_stdlib_corpus(str(tmp_path / "x"), include=["no_such_package/*.py"])
    with pytest.raises(DataError, match="val fraction 0.01 leave an empty split"):
        build_stdlib_corpus(str(tmp_path / "y"), val_fraction=0.01, include=["json/__init__.py"])
    with pytest.raises(DataError, match="--val-fraction must be in"):
        build_stdlib_corpus(str(tmp_path / "z"), val_fraction=1.5)
