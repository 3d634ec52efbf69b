"""Webdataset tar shards with a manifest: random access to any sample over fsspec.

On-disk format of one split directory (local path or fsspec URL):
  manifest.json      {"format": "distreg-wds/1", "num_samples": N, "num_classes": C,
                      "classes": "../classes.json", "offsets": {"file", "sha256"},
                      "shards": [{"file", "num_samples", "bytes", "sha256",
                                  "first_key", "last_key"}, ...]}
  offsets.npy        int64; for each shard in order, the byte offset of each sample's
                     first tar header followed by the offset where its last sample ends
                     (N + number of shards values)
  crc32.npy          uint32 crc32 of each sample's bytes (manifest "sample_crc32"):
                     every ranged read is verified, so a size-preserving corruption
                     is named by shard and offset (whole-shard sha256 cannot be checked
                     by a reader that fetches single samples)
  shard-000000.tar   plain webdataset shards (`<key>.cls`, `<key>.jpg`), readable by
                     any webdataset loader

Why offsets: the global batch of a step must not depend on the world size, so a rank
needs *its* samples, wherever they are, rather than whole shards of its own. With
the offsets one ranged read fetches exactly one sample (all its members, which are
adjacent in the tar), so the job as a whole reads every byte once per epoch. Sample
`i` (its global index) is the i-th sample of the concatenated shards.

Whole-shard local caching for object stores is fsspec's: use a chained URL such as
`simplecache::s3://bucket/imagenet/train` as the path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import zlib

import fsspec
import numpy as np

from distreg.data.errors import DataError

FORMAT = "distreg-wds/1"
MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
CRC32 = "crc32.npy"  # optional: uint32 crc32 of each sample's byte range, in sample order
BLOCK = tarfile.BLOCKSIZE


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def member_offsets(tar_bytes: bytes) -> tuple[list[int], int, list[str]]:
    """(start offset of each sample, end offset of the last one, keys) of a tar written
    by webdataset's TarWriter: a sample starts at the header of its first member."""
    starts, keys = [], []
    end = 0
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        for m in tf:
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                starts.append(m.offset)
                keys.append(key)
            end = m.offset_data + -(-m.size // BLOCK) * BLOCK
    return starts, end, keys


def parse_sample(chunk: bytes, shard: str, offset: int) -> dict[str, bytes]:
    """The members of one sample from its byte range: {"__key__": key, ext: data}.

    Written by hand (on top of `tarfile.TarInfo.frombuf`, which decodes a header and
    checks its checksum) because `tarfile.TarFile` silently stops at a damaged header
    that is not the archive's first: a sample would lose its image without an error.
    Every failure names the shard and the member's byte offset in it."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(chunk):
        at = offset + pos
        header = chunk[pos : pos + BLOCK]
        if len(header) < BLOCK:
            raise DataError(f"shard {shard}: member at byte offset {at}: truncated tar header")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise DataError(f"shard {shard}: member at byte offset {at}: corrupt tar header ({e})") from None
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise DataError(f"shard {shard}: member {info.name!r} at byte offset {at}: "
                            f"unsupported tar member type {info.type!r}")
        data = chunk[pos + BLOCK : pos + BLOCK + info.size]
        if len(data) < info.size:
            raise DataError(f"shard {shard}: member {info.name!r} at byte offset {at}: "
                            f"data truncated ({len(data)} of {info.size} bytes)")
        key, _, ext = info.name.partition(".")
        if out and out["__key__"] != key:
            raise DataError(f"shard {shard}: member {info.name!r} at byte offset {at}: expected a member of "
                            f"sample {out['__key__']!r} (offsets.npy does not match the shard)")
        out["__key__"] = key
        out[ext] = data
        pos += BLOCK + -(-info.size // BLOCK) * BLOCK
    return out


class ShardIndex:
    """The manifest and sample offsets of one split; `read(i)` fetches sample i."""

    def __init__(self, url: str, verify: bool = True):
        self.url = url.rstrip("/")
        fs, self.root = fsspec.core.url_to_fs(self.url)
        path = posixpath.join(self.root, MANIFEST)
        try:
            manifest = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            raise DataError(f"data.path: no webdataset split at {url!r} (missing {path}); create one with "
                            f"`distreg data imagenet-to-shards SRC DEST` and point data.path at DEST/train") from None
        if manifest.get("format") != FORMAT:
            raise DataError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
        if manifest.get("complete") is False:
            missing = list(manifest.get("missing", []))
            try:  # shards finished since the manifest was written (their records exist)
                done = {posixpath.basename(p)[: -len(".json")] for p in fs.glob(posixpath.join(self.root, "_parts", "*.json"))}
            except (FileNotFoundError, OSError):
                done = set()
            still = [m for m in missing if m not in done] or missing
            shown = ", ".join(still[:10]) + (f" and {len(still) - 10} more" if len(still) > 10 else "")
            raise DataError(f"data.path: {url!r} is an incomplete split ({path} has complete=false): "
                            f"{len(still)} of {manifest.get('num_shards', '?')} shards missing: {shown}; re-run "
                            f"`distreg data imagenet-to-shards` with the same arguments to finish it")
        self.manifest = manifest
        self.num_classes = int(manifest.get("num_classes", 0))
        self.shards = [posixpath.join(self.root, s["file"]) for s in manifest["shards"]]
        self.shard_bytes = np.array([s["bytes"] for s in manifest["shards"]], dtype=np.int64)
        counts = np.array([s["num_samples"] for s in manifest["shards"]], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)])  # first global index of each shard
        self.num_samples = int(self.first[-1])
        if self.num_samples != manifest["num_samples"]:
            raise DataError(f"{path}: num_samples {manifest['num_samples']} but the shards hold {self.num_samples}")
        opath = posixpath.join(self.root, manifest["offsets"]["file"])
        raw = fs.cat_file(opath)
        if sha256(raw) != manifest["offsets"]["sha256"]:
            raise DataError(f"{opath}: checksum does not match {path}")
        self.offsets = np.load(io.BytesIO(raw))
        if len(self.offsets) != self.num_samples + len(self.shards):
            raise DataError(f"{opath}: {len(self.offsets)} offsets for {self.num_samples} samples in "
                            f"{len(self.shards)} shards")
        self.crc32 = None
        if verify and "sample_crc32" in manifest:
            cpath = posixpath.join(self.root, manifest["sample_crc32"]["file"])
            raw = fs.cat_file(cpath)
            if sha256(raw) != manifest["sample_crc32"]["sha256"]:
                raise DataError(f"{cpath}: checksum does not match {path}")
            self.crc32 = np.load(io.BytesIO(raw))
            if len(self.crc32) != self.num_samples:
                raise DataError(f"{cpath}: {len(self.crc32)} checksums for {self.num_samples} samples")
        self._fs, self._pid = fs, os.getpid()

    def __len__(self) -> int:
        return self.num_samples

    def check_files(self) -> None:
        """Every shard present with its manifest size (one listing; the driver's check
        before workers start)."""
        fs = self.fs()
        try:
            sizes = {posixpath.basename(e["name"]): e["size"] for e in fs.ls(self.root, detail=True)}
        except (FileNotFoundError, OSError):
            sizes = {}
        bad = [f"{posixpath.basename(s)} ({'missing' if sizes.get(posixpath.basename(s)) is None else f'{sizes[posixpath.basename(s)]} bytes, manifest says {int(n)}'})"
               for s, n in zip(self.shards, self.shard_bytes) if sizes.get(posixpath.basename(s)) != n]
        if bad:
            raise DataError(f"data.path: {self.url!r}: {len(bad)} shard(s) missing or of the wrong size: "
                            f"{', '.join(bad[:10])}")

    def fs(self):
        # One filesystem object per process: fsspec's async filesystems (http, s3) own
        # an event loop that must not be shared with forked dataloader workers.
        if self._pid != os.getpid():
            self._fs = fsspec.core.url_to_fs(self.url)[0]
            self._pid = os.getpid()
        return self._fs

    def locate(self, index: int) -> tuple[int, int, int]:
        """(shard number, start, end) of sample `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} outside [0, {self.num_samples}) of {self.url}")
        j = int(np.searchsorted(self.first, index, side="right")) - 1
        k = j + index  # shard j's offsets begin at first[j] + j
        return j, int(self.offsets[k]), int(self.offsets[k + 1])

    def read(self, index: int) -> dict[str, bytes]:
        j, start, end = self.locate(index)
        shard = self.shards[j]
        try:
            chunk = self.fs().cat_file(shard, start=start, end=end)
        except FileNotFoundError:
            raise DataError(f"shard {shard}: missing (listed in {MANIFEST})") from None
        if len(chunk) == self.shard_bytes[j] and (start, end) != (0, len(chunk)):
            chunk = chunk[start:end]  # a server that ignores Range requests sent the whole shard
        if len(chunk) != end - start:
            raise DataError(f"shard {shard}: sample {index} at byte offset {start}: read {len(chunk)} of "
                            f"{end - start} bytes (shard truncated?)")
        if self.crc32 is not None and zlib.crc32(chunk) != int(self.crc32[index]):
            raise DataError(f"shard {shard}: sample {index} at byte offset {start}: crc32 does not match "
                            f"{CRC32} (corrupt shard: same size, different bytes)")
        return parse_sample(chunk, shard, start)
