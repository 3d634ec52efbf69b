"""Sliced reads of the tensors of a Hugging Face safetensors directory.

A directory holds `model.safetensors`, or shards `model-0000x-of-0000y.safetensors`
listed by `model.safetensors.index.json` (weight_map: tensor -> file). Only headers are
read up front; values are read by row ranges, so a rank that holds rows [r0, r1) of a
7B weight reads those rows and nothing else. Local files are read with safetensors'
`safe_open(...).get_slice`; other fsspec URLs (s3://, gs://, ...) by byte ranges from
the safetensors header's offsets (the same format: u64 header length, JSON header,
row-major data).
"""
from __future__ import annotations

import json
import posixpath
import struct

import fsspec
import torch

from distreg.interop.hf_config import INDEX_FILE, SINGLE_FILE, HFFormatError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class _RemoteFile:
    """Byte-range reads of one safetensors file at an fsspec URL."""

    def __init__(self, url: str):
        self.fs, self.path = fsspec.core.url_to_fs(url)
        with self.fs.open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.base, self.header = 8 + n, header

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        entry = self.header[name]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = dtype.itemsize * (1 if len(shape) < 2 else shape[1])
        begin = self.base + entry["data_offsets"][0] + start * row_bytes
        with self.fs.open(self.path, "rb") as f:
            f.seek(begin)
            data = bytearray(f.read((stop - start) * row_bytes))
        out = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return out.view(stop - start, *shape[1:])


class _LocalFile:
    def __init__(self, url: str):
        from safetensors import safe_open

        self.handle = safe_open(url.removeprefix("file://"), framework="pt")

    def names(self) -> list[str]:
        return list(self.handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.handle.get_slice(name)[start:stop]


class SafetensorsDir:
    """Tensor name -> file of an HF directory, with sliced reads."""

    def __init__(self, directory: str):
        self.directory = directory.rstrip("/")
        index_url = posixpath.join(self.directory, INDEX_FILE)
        fs, index_path = fsspec.core.url_to_fs(index_url)
        if fs.exists(index_path):
            try:
                with fs.open(index_path, "r") as f:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFFormatError(f"{index_url}: not a safetensors index (weight_map): {e}") from None
        else:
            single = posixpath.join(self.directory, SINGLE_FILE)
            if not fs.exists(fsspec.core.url_to_fs(single)[1]):
                raise HFFormatError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE}; "
                                    "not a Hugging Face safetensors model directory")
            self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE, None).names()}
        self._files: dict[str, object] = {}

    def file_of(self, name: str) -> str:
        return posixpath.join(self.directory, self.weight_map[name])

    def _open(self, file: str, tensor: str | None):
        url = posixpath.join(self.directory, file)
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise HFFormatError(f"{url}: shard missing (it holds tensor {tensor}, per {INDEX_FILE})")
        try:
            handle = _LocalFile(url) if _is_local(url) else _RemoteFile(url)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
            raise HFFormatError(f"{url}: not a readable safetensors file ({tensor}): {e}") from None
        return handle

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = self._open(file, name)
        return self._files[file]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._file(name)
        if name not in handle.names():
            raise HFFormatError(f"{self.file_of(name)}: tensor {name} is listed in {INDEX_FILE} but not in the file")
        return handle.shape(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (elements, for a 1-D tensor) of tensor `name`."""
        return self._file(name).rows(name, start, stop)
