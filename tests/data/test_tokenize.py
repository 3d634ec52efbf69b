"""`distreg data tokenize`: byte-level and tokenizer.json, EOS between documents,
dtype by vocabulary, index counts, determinism over processes, fsspec input/output."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from distreg.data.errors import DataError
from distreg.data.tokenize import tokenize_corpus
from distreg.data.tokens import TokenDataset

DOCS = ["hello world", "ünïcode ✓", "the quick brown fox", "a", "jumps over the lazy dog"]


def _corpus(root) -> str:
    (root / "corpus" / "sub").mkdir(parents=True)
    with open(root / "corpus" / "a.jsonl", "w") as f:
        for d in DOCS[:3]:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
    (root / "corpus" / "sub" / "b.txt").write_text(DOCS[3])
    with gzip.open(root / "corpus" / "sub" / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": DOCS[4]}) + "\n")
    (root / "corpus" / "ignored.csv").write_text("not,text\n")
    return str(root / "corpus")


def _all_tokens(url: str) -> tuple[dict, np.ndarray]:
    index = json.load(open(f"{url}/index.json"))
    dtype = np.dtype("<u2" if index["dtype"] == "uint16" else "<u4")
    return index, np.concatenate([np.fromfile(f"{url}/{s['file']}", dtype=dtype) for s in index["shards"]])


def test_bytes_tokenizer_eos_between_documents(tmp_path):
    src = _corpus(tmp_path)
    out = str(tmp_path / "bytes")
    summary = tokenize_corpus(src, out, "bytes", shard_tokens=16, processes=1)
    index, toks = _all_tokens(out)
    expected = [t for d in DOCS for t in list(d.encode()) + [256]]  # files in sorted order: a, sub/b, sub/c
    assert toks.tolist() == expected
    assert index["dtype"] == "uint16" and index["vocab_size"] == 257 and index["eos_id"] == 256
    assert index["num_tokens"] == summary["num_tokens"] == len(expected) == sum(s["num_tokens"] for s in index["shards"])
    assert index["num_documents"] == 5 and all(s["num_tokens"] <= 16 and "sha256" in s for s in index["shards"])
    assert len(TokenDataset(out, seq_len=4)) > 0  # readable by the token source


def test_parallel_processes_give_identical_shards(tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"document number {i} " * (i + 1))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    tokenize_corpus(str(src), one, "bytes", shard_tokens=32, task_bytes=30, processes=1)
    tokenize_corpus(str(src), two, "bytes", shard_tokens=32, task_bytes=30, processes=2)
    assert json.load(open(f"{one}/index.json"))["shards"] == json.load(open(f"{two}/index.json"))["shards"]
    assert _all_tokens(one)[1].tolist() == _all_tokens(two)[1].tolist()


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """A real tokenizer.json (WordLevel, 70 000 words: more than uint16 holds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def test_tokenizer_json_uint32_and_memory_filesystem(word_tokenizer):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/tok-in/docs.jsonl", b'{"text": "w0 w69999"}\n{"text": "w5"}\n{"text": "zzz w7"}\n')
    summary = tokenize_corpus("memory://tok-in", "memory://tok-out", word_tokenizer)
    assert summary["vocab_size"] == 70_002 and summary["eos_id"] == 1
    index = json.loads(fs.cat("/tok-out/index.json"))
    assert index["dtype"] == "uint32"
    toks = np.frombuffer(fs.cat("/tok-out/" + index["shards"][0]["file"]), dtype="<u4")
    assert toks.tolist() == [2, 70_001, 1, 7, 1, 0, 9, 1]  # EOS after every document, <unk> for zzz
    assert TokenDataset("memory://tok-out", seq_len=3).window(1).tolist() == [7, 1, 0, 9]


def test_bad_inputs_are_named(tmp_path, word_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not a JSON object with a 'text' string"):
        tokenize_corpus(str(bad), str(tmp_path / "o"), "bytes")
    with pytest.raises(DataError, match=r"--eos-token '<nope>' is not in the vocabulary"):
        tokenize_corpus(str(bad), str(tmp_path / "o"), word_tokenizer, eos_token="<nope>")
    with pytest.raises(DataError, match="does not exist"):
        tokenize_corpus(str(tmp_path / "absent"), str(tmp_path / "o"), "bytes")


def test_cli(tmp_path, capsys):
    from distreg.cli import main

    src = _corpus(tmp_path)
    assert main(["data", "tokenize", src, str(tmp_path / "out"), "--tokenizer", "bytes", "--processes", "1"]) == 0
    assert "of 5 documents" in capsys.readouterr().out
