"""The tokenizer files of an HF export, from what the run's data records.

`distreg data tokenize` writes the tokenizer it used into the dataset's `index.json`
(`"tokenizer"`: "bytes" or the URL of a Hugging Face `tokenizer.json`, `"eos_id"`).
When every dataset of CONFIG (`data.path`, or each mixture source) was tokenized with the
same `tokenizer.json`, it is copied into the export with a `tokenizer_config.json`
(PreTrainedTokenizerFast, EOS token), so `AutoTokenizer.from_pretrained(DIR)` works.
The byte tokenizer has no HF equivalent file: only its EOS id goes into config.json.
Synthetic data (no tokenizer recorded) exports no tokenizer.
"""
from __future__ import annotations

import json
import os
import posixpath
import warnings

import fsspec

from distreg.config import RunConfig


def _dataset_indexes(cfg: RunConfig) -> list[tuple[str, dict]]:
    paths = {"tokens": [cfg.data.path], "mixture": [s.path for s in cfg.data.sources]}.get(cfg.data.kind, [])
    out = []
    for path in paths:
        url = posixpath.join(path, "index.json")
        try:
            with fsspec.open(url, "r") as f:
                out.append((url, json.load(f)))
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"HF export: {url} unreadable; no tokenizer files exported", stacklevel=3)
            return []
    return out


def export_tokenizer(cfg: RunConfig, out: str, max_seq_len: int) -> dict:
    """Copy the run's tokenizer into `out`; returns {"source", "eos_token_id"} (empty: none)."""
    indexes = _dataset_indexes(cfg)
    recorded = {(index.get("tokenizer"), index.get("eos_id")) for _, index in indexes}
    if len(recorded) != 1 or next(iter(recorded))[0] is None:
        if len(recorded) > 1:
            warnings.warn(f"HF export: the datasets were tokenized differently ({sorted(map(str, recorded))}); "
                          "no tokenizer files exported", stacklevel=2)
        return {}
    source, eos_id = next(iter(recorded))
    if source == "bytes":
        return {"source": "bytes", "eos_token_id": eos_id}
    from tokenizers import Tokenizer

    with fsspec.open(source, "r", encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
                        "eos_token": Tokenizer.from_str(text).id_to_token(eos_id), "clean_up_tokenization_spaces": False}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    return {"source": source, "eos_token_id": eos_id}
