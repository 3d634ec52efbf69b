"""ILSVRC-2012 folder tree -> webdataset tar shards with a manifest (`tarshards` format).

Source layout (local path or fsspec URL):
  train/<wnid>/*.JPEG
  val/<wnid>/*.JPEG                      (after the usual valprep), or
  val/*.JPEG + labels: the devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat,
                      LOC_val_solution.csv (Kaggle: ImageId,PredictionString)
                      or lines "<image name> <wnid | class index>" (imagenet_labels.py)
  LOC_synset_mapping.txt                 optional: "<wnid> <names>" per line

Output under DEST: `classes.json` (index -> wnid, name), and per split `manifest.json`,
`offsets.npy` and `shard-NNNNNN.tar` (members `<key>.jpg` with the source bytes
unchanged and `<key>.cls` with the class index; `__key__` is the source file's stem).

The plan is deterministic: classes are the sorted wnids (torchvision's ImageFolder
order) and samples are shuffled with `seed` before being cut into shards of
`shard_size`, so plain streaming webdataset readers see mixed classes per shard.
Shards are written in parallel processes or as Ray tasks over a cluster's nodes
(`convert_run`), atomically. Restartable: after a shard is uploaded, a record
`_parts/<shard>.json` (its plan hash, size, checksum and sample offsets) is written; a
rerun skips every shard whose record matches the plan and whose file has the recorded
size (and checksum with `verify=True`). While shards are missing, `manifest.json` says
`"complete": false` and lists them (readers refuse the split); the full manifest, with
per-shard counts and sha256, is written last.
"""
from __future__ import annotations

import io
import json
import posixpath
import random
import tarfile
import zlib
from dataclasses import dataclass

import fsspec
import numpy as np

from distreg.data.tarshards import CRC32, FORMAT, MANIFEST, OFFSETS, member_offsets, sha256
from distreg.data.errors import DataError
from distreg.data.imagenet_labels import read_val_labels

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
MTIME = 1_325_376_000  # fixed member mtime (2012-01-01): identical runs give identical shards


@dataclass
class Sample:
    key: str
    path: str
    label: int
    size: int = 0  # source bytes (progress only; not part of the plan)


@dataclass
class ShardPlan:
    dest: str  # split directory URL
    name: str
    samples: list[Sample]

    @property
    def plan_sha(self) -> str:
        # The source's last two path parts, not its root: a moved source tree still matches.
        return sha256(json.dumps([(s.key, "/".join(s.path.split("/")[-2:]), s.label) for s in self.samples]).encode())


def _stem(path: str) -> str:
    return posixpath.basename(path).split(".", 1)[0]


def _images(fs, folder: str, sizes: dict[str, int] | None = None) -> list[str]:
    found = fs.find(folder, detail=True)
    if sizes is not None:
        sizes.update({p: int(info.get("size") or 0) for p, info in found.items()})
    return sorted(p for p in found if p.lower().endswith(IMAGE_EXTS))


def scan(src: str, val_labels: str | None = None) -> tuple[list[dict], dict[str, list[Sample]]]:
    """(classes, samples per split) of an ILSVRC tree."""
    fs, root = fsspec.core.url_to_fs(src)
    root = root.rstrip("/")
    train_dir, val_dir = posixpath.join(root, "train"), posixpath.join(root, "val")
    has_train, has_val = fs.isdir(train_dir), fs.isdir(val_dir)
    if not (has_train or has_val):
        raise DataError(f"{src}: no train/ or val/ folder (expected the ILSVRC-2012 layout)")
    class_dir = train_dir if has_train else val_dir
    wnids = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(class_dir, detail=False) if fs.isdir(p))
    if not wnids:
        raise DataError(f"{class_dir}: no class folders (<wnid>/)")
    names = {}
    mapping = posixpath.join(root, "LOC_synset_mapping.txt")
    if fs.exists(mapping):
        for line in fs.cat_file(mapping).decode().splitlines():
            if line.strip():
                wnid, _, name = line.partition(" ")
                names[wnid] = name.strip()
    classes = [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)]
    wnid_index = {w: i for i, w in enumerate(wnids)}

    splits: dict[str, list[Sample]] = {}
    sizes: dict[str, int] = {}
    if has_train:
        splits["train"] = [Sample(_stem(p), p, wnid_index[posixpath.basename(posixpath.dirname(p))])
                           for p in _images(fs, train_dir, sizes)]
    if has_val:
        files = _images(fs, val_dir, sizes)
        if any(posixpath.dirname(p) != val_dir for p in files):
            samples = []
            for p in files:
                wnid = posixpath.basename(posixpath.dirname(p))
                if wnid not in wnid_index:
                    raise DataError(f"{p}: val class folder {wnid!r} is not a train class")
                samples.append(Sample(_stem(p), p, wnid_index[wnid]))
        else:
            labels = read_val_labels(fs, root, val_labels, wnid_index)
            missing = [p for p in files if _stem(p) not in labels]
            if missing:
                raise DataError(f"{missing[0]}: no label in the val label file ({len(missing)} images lack one)")
            samples = [Sample(_stem(p), p, labels[_stem(p)]) for p in files]
        splits["val"] = samples
    for split, samples in splits.items():
        for s in samples:
            s.size = sizes.get(s.path, 0)
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise DataError(f"{src}/{split}: two images share a file name stem (keys must be unique)")
        if any(len(k) > 90 or "." in k for k in keys):
            raise DataError(f"{src}/{split}: file name stems must be short and dot-free to serve as keys")
    return classes, splits


def _record_path(plan: ShardPlan) -> str:
    return posixpath.join(plan.dest, "_parts", plan.name + ".json")


def write_shard(job: tuple[str, ShardPlan]) -> dict:
    """Build one shard in memory (to learn its sample offsets and checksum), upload it
    (atomically), then write its record. Runs in a worker process or Ray task; a retry
    rewrites the same bytes."""
    from distreg.data.convert_run import atomic_write

    src, plan = job
    sfs = fsspec.core.url_to_fs(src)[0]
    dfs, _ = fsspec.core.url_to_fs(plan.dest)
    buf = io.BytesIO()
    # What webdataset's TarWriter writes (USTAR, `<key>.<ext>` members in sorted ext
    # order, text class index), with stdlib tarfile: importing webdataset imports torch,
    # seconds of start-up in every converter process for a few lines of tar writing.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in plan.samples:
            for ext, payload in (("cls", str(s.label).encode()), ("jpg", sfs.cat_file(s.path))):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), MTIME, 0o444, "bigdata", "bigdata"
                tf.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    starts, end, keys = member_offsets(data)
    assert keys == [s.key for s in plan.samples], "TarWriter changed the sample order"
    atomic_write(dfs, posixpath.join(plan.dest, plan.name), data)
    bounds = starts + [end]
    record = {"file": plan.name, "num_samples": len(plan.samples), "bytes": len(data), "sha256": sha256(data),
              "first_key": keys[0], "last_key": keys[-1], "plan_sha": plan.plan_sha, "offsets": bounds,
              "crc32": [zlib.crc32(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]}
    atomic_write(dfs, _record_path(plan), json.dumps(record).encode())  # last: marks the shard complete
    return record


def _complete(dfs, plan: ShardPlan, verify: bool) -> dict | None:
    """The shard's record if the shard is already written and matches the plan."""
    rpath = _record_path(plan)
    if not dfs.exists(rpath):
        return None
    record = json.loads(dfs.cat_file(rpath))
    spath = posixpath.join(plan.dest, plan.name)
    if record.get("plan_sha") != plan.plan_sha or not dfs.exists(spath) or dfs.size(spath) != record["bytes"]:
        return None
    if verify and sha256(dfs.cat_file(spath)) != record["sha256"]:
        return None
    return record


def convert_imagenet(src: str, dest: str, shard_size: int = 1000, processes: int = 1, seed: int = 0,
                     val_labels: str | None = None, verify: bool = False, log=print, ray: bool = False,
                     max_in_flight: int | None = None, mlflow_uri: str | None = None,
                     progress_every: float = 10.0) -> dict:
    """Convert an ILSVRC tree; returns {"written": n, "skipped": n, "splits": {split:
    num_samples}, "written_shards": ["train/shard-000003.tar", ...], "nodes": {...}}.

    `processes > 1` writes shards in that many spawned processes, `ray=True` as Ray
    tasks over the cluster (a `memory://` destination is per process: use neither)."""
    from distreg.data.convert_run import Progress, atomic_write, run_tasks

    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    classes, splits = scan(src, val_labels)
    dfs, droot = fsspec.core.url_to_fs(dest)
    droot = droot.rstrip("/")
    dfs.makedirs(droot, exist_ok=True)
    atomic_write(dfs, posixpath.join(droot, "classes.json"), json.dumps(classes, indent=1).encode())
    summary = {"written": 0, "skipped": 0, "splits": {}}
    plans: dict[str, list[ShardPlan]] = {}
    records: dict[str, list[dict | None]] = {}
    for split, samples in splits.items():
        samples = list(samples)
        random.Random(f"{seed}/{split}").shuffle(samples)
        dfs.makedirs(posixpath.join(droot, split, "_parts"), exist_ok=True)
        plans[split] = [ShardPlan(dest.rstrip("/") + "/" + split, f"shard-{j:06d}.tar", samples[i : i + shard_size])
                        for j, i in enumerate(range(0, len(samples), shard_size))]
        records[split] = [_complete(dfs, p, verify) for p in plans[split]]
        done = sum(r is not None for r in records[split])
        summary["skipped"] += done
        summary["splits"][split] = len(samples)
        log(f"{split}: {len(samples)} images, {len(plans[split])} shards ({done} already complete)")
        missing = [p.name for p, r in zip(plans[split], records[split]) if r is None]
        if missing:  # readers (and `distreg train`) refuse the split until it is finished
            _write_incomplete_manifest(dfs, posixpath.join(droot, split), split, missing, len(plans[split]))
    todo = [(split, i) for split in plans for i, r in enumerate(records[split]) if r is None]
    all_plans = [p for split in plans for p in plans[split]]
    progress = Progress(f"imagenet-to-shards {dest}", "images", sum(len(p.samples) for p in all_plans),
                        sum(s.size for p in all_plans for s in p.samples), every=progress_every, mlflow_uri=mlflow_uri)
    done_plans = [plans[split][i] for split in plans for i, r in enumerate(records[split]) if r is not None]
    progress.skip(sum(len(p.samples) for p in done_plans), sum(s.size for p in done_plans for s in p.samples), 0)
    nodes: dict[str, int] = {}
    status = "FAILED"
    try:
        jobs = [(src, plans[s][i]) for s, i in todo]
        for k, record, where in run_tasks(write_shard, jobs, "ray" if ray else "local", processes, max_in_flight):
            split, i = todo[k]
            records[split][i] = record
            nodes[where] = nodes.get(where, 0) + 1
            plan = plans[split][i]
            progress.add(len(plan.samples), sum(s.size for s in plan.samples), len(plan.samples))
        status = "FINISHED"
    finally:
        progress.close(status)
    summary["written"] = len(todo)
    summary["written_shards"] = [f"{split}/{plans[split][i].name}" for split, i in todo]
    summary["nodes"] = nodes
    for split in plans:
        _write_manifest(dfs, posixpath.join(droot, split), split, records[split], len(classes))
        _remove_stale(dfs, posixpath.join(droot, split), {p.name for p in plans[split]})
    return summary


def _write_incomplete_manifest(dfs, split_root: str, split: str, missing: list[str], num_shards: int) -> None:
    from distreg.data.convert_run import atomic_write

    manifest = {"format": FORMAT, "split": split, "complete": False, "num_shards": num_shards, "missing": missing}
    atomic_write(dfs, posixpath.join(split_root, MANIFEST), json.dumps(manifest, indent=1).encode())


def _remove_stale(dfs, split_root: str, keep: set[str]) -> None:
    """Shards (and records) of an earlier plan with more shards than this one."""
    for path in dfs.glob(posixpath.join(split_root, "*.tmp-*")) + dfs.glob(posixpath.join(split_root, "_parts", "*.tmp-*")):
        dfs.rm(path)  # temporaries of local writes a crash interrupted
    for path in dfs.glob(posixpath.join(split_root, "shard-*.tar")):
        name = posixpath.basename(path)
        if name not in keep:
            dfs.rm(path)
            record = posixpath.join(split_root, "_parts", name + ".json")
            if dfs.exists(record):
                dfs.rm(record)


def _write_manifest(dfs, split_root: str, split: str, records: list[dict], num_classes: int) -> None:
    offsets = np.concatenate([np.asarray(r["offsets"], dtype=np.int64) for r in records]) if records else np.zeros(0, np.int64)
    obuf = io.BytesIO()
    np.save(obuf, offsets)
    from distreg.data.convert_run import atomic_write

    atomic_write(dfs, posixpath.join(split_root, OFFSETS), obuf.getvalue())
    checksums = {}
    if records and all("crc32" in r for r in records):  # per-sample crc32: ranged reads verify what they fetch
        cbuf = io.BytesIO()
        np.save(cbuf, np.concatenate([np.asarray(r["crc32"], dtype=np.uint32) for r in records]))
        atomic_write(dfs, posixpath.join(split_root, CRC32), cbuf.getvalue())
        checksums = {"sample_crc32": {"file": CRC32, "sha256": sha256(cbuf.getvalue())}}
    manifest = {"format": FORMAT, "split": split, "complete": True, "num_samples": sum(r["num_samples"] for r in records),
                "num_classes": num_classes, "classes": "../classes.json", "members": ["cls", "jpg"],
                "offsets": {"file": OFFSETS, "sha256": sha256(obuf.getvalue())}, **checksums,
                "shards": [{k: r[k] for k in ("file", "num_samples", "bytes", "sha256", "first_key", "last_key")}
                           for r in records]}
    atomic_write(dfs, posixpath.join(split_root, MANIFEST), json.dumps(manifest, indent=1).encode())  # last
