"""ILSVRC tree -> webdataset shards: round trip, layouts, determinism, restart, fsspec."""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from distreg.data.errors import DataError
from distreg.data.imagenet_convert import convert_imagenet
from distreg.data.synth_imagenet import synth_imagenet
from distreg.data.tarshards import ShardIndex
from tests.data.conftest import NUM_CLASSES, SHARD_SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS

QUIET = {"log": lambda *_: None}


def _tar_samples(split_dir: str) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, read with plain tarfile (what any webdataset reader sees)."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(glob.glob(os.path.join(split_dir, "shard-*.tar"))):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_round_trip_train_and_val(ilsvrc_tree, imagenet_shards):
    classes = json.load(open(os.path.join(imagenet_shards, "classes.json")))
    wnids = sorted(os.listdir(os.path.join(ilsvrc_tree, "train")))
    assert [c["wnid"] for c in classes] == wnids and classes[1]["name"] == "synthetic class 1"

    train = _tar_samples(os.path.join(imagenet_shards, "train"))
    assert len(train) == NUM_CLASSES * TRAIN_PER_CLASS
    for wnid in wnids:
        for path in glob.glob(os.path.join(ilsvrc_tree, "train", wnid, "*.JPEG")):
            sample = train[os.path.basename(path).split(".")[0]]  # __key__ = file stem
            assert sample["jpg"] == open(path, "rb").read()  # bytes unchanged
            assert int(sample["cls"]) == wnids.index(wnid)

    val = _tar_samples(os.path.join(imagenet_shards, "val"))
    rows = list(csv.DictReader(open(os.path.join(ilsvrc_tree, "LOC_val_solution.csv"))))
    assert len(val) == len(rows) == NUM_CLASSES * VAL_PER_CLASS
    for row in rows:  # labels from the Kaggle solution file
        assert int(val[row["ImageId"]]["cls"]) == wnids.index(row["PredictionString"].split()[0])
        assert val[row["ImageId"]]["jpg"] == open(os.path.join(ilsvrc_tree, "val", row["ImageId"] + ".JPEG"), "rb").read()


def test_manifest_checksums_offsets_and_global_index(imagenet_shards):
    split = os.path.join(imagenet_shards, "train")
    manifest = json.load(open(os.path.join(split, "manifest.json")))
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 10, 10, 8]
    for s in manifest["shards"]:
        data = open(os.path.join(split, s["file"]), "rb").read()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    index = ShardIndex(split)
    assert len(index) == 48 and index.num_classes == NUM_CLASSES
    # Global index i = i-th sample of the concatenated shards, in the manifest's order.
    keys = [index.read(i)["__key__"] for i in range(len(index))]
    assert keys[0] == manifest["shards"][0]["first_key"] and keys[-1] == manifest["shards"][-1]["last_key"]
    assert keys[SHARD_SIZE] == manifest["shards"][1]["first_key"]
    assert len(set(keys)) == 48
    # Shuffled before sharding: the first shard mixes classes.
    assert len({int(index.read(i)["cls"]) for i in range(SHARD_SIZE)}) > 1


def test_val_folders_parallel_processes_give_identical_output(tmp_path):
    src = str(tmp_path / "src")
    synth_imagenet(src, num_classes=3, train_per_class=4, val_per_class=3, min_size=16, max_size=20,
                   val_layout="folders")
    one = convert_imagenet(src, str(tmp_path / "one"), shard_size=4, processes=1, **QUIET)
    two = convert_imagenet(src, str(tmp_path / "two"), shard_size=4, processes=2, **QUIET)
    assert one.pop("nodes") == {"driver": 6} and two.pop("nodes") == {"pool": 6}
    assert one == two and {k: one[k] for k in ("written", "skipped", "splits")} == {
        "written": 6, "skipped": 0, "splits": {"train": 12, "val": 9}}
    for split in ("train", "val"):
        files = sorted(os.listdir(tmp_path / "one" / split))
        for name in files:
            if os.path.isfile(tmp_path / "one" / split / name):
                assert (tmp_path / "one" / split / name).read_bytes() == (tmp_path / "two" / split / name).read_bytes()
    val = _tar_samples(str(tmp_path / "one" / "val"))
    wnids = sorted(os.listdir(os.path.join(src, "val")))
    for wnid in wnids:
        for path in glob.glob(os.path.join(src, "val", wnid, "*.JPEG")):
            assert int(val[os.path.basename(path).split(".")[0]]["cls"]) == wnids.index(wnid)


def test_restart_skips_complete_shards_and_redoes_damaged_ones(ilsvrc_tree, tmp_path):
    dest = str(tmp_path / "out")
    first = convert_imagenet(ilsvrc_tree, dest, shard_size=SHARD_SIZE, **QUIET)
    assert first["written"] == 6 and first["skipped"] == 0  # 5 train + 1 val
    split = os.path.join(dest, "train")
    manifest = open(os.path.join(split, "manifest.json")).read()
    os.remove(os.path.join(split, "shard-000001.tar"))  # lost
    with open(os.path.join(split, "shard-000003.tar"), "r+b") as f:  # cut short by a crash
        f.truncate(1000)
    os.remove(os.path.join(split, "_parts", "shard-000004.tar.json"))  # died before its record
    mtime = os.path.getmtime(os.path.join(split, "shard-000000.tar"))
    again = convert_imagenet(ilsvrc_tree, dest, shard_size=SHARD_SIZE, **QUIET)
    assert again["written"] == 3 and again["skipped"] == 3
    assert os.path.getmtime(os.path.join(split, "shard-000000.tar")) == mtime  # not rewritten
    assert open(os.path.join(split, "manifest.json")).read() == manifest  # same result as uninterrupted

    # --verify also catches a same-size corruption; a changed plan (shard size) rewrites all.
    with open(os.path.join(split, "shard-000002.tar"), "r+b") as f:
        f.seek(700)
        f.write(b"XX")
    assert convert_imagenet(ilsvrc_tree, dest, shard_size=SHARD_SIZE, **QUIET)["written"] == 0
    assert convert_imagenet(ilsvrc_tree, dest, shard_size=SHARD_SIZE, verify=True, **QUIET)["written"] == 1
    assert convert_imagenet(ilsvrc_tree, dest, shard_size=16, **QUIET)["written"] == 3  # val's one shard is unchanged
    assert sorted(f for f in os.listdir(split) if f.endswith(".tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert len(os.listdir(os.path.join(split, "_parts"))) == 3  # stale shards of the old plan removed


def test_memory_destination_and_label_file(ilsvrc_tree, tmp_path):
    # "<image> <wnid>" label lines instead of the Kaggle CSV, written to memory://.
    rows = list(csv.DictReader(open(os.path.join(ilsvrc_tree, "LOC_val_solution.csv"))))
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{r['ImageId']}.JPEG {r['PredictionString'].split()[0]}\n" for r in rows))
    convert_imagenet(ilsvrc_tree, "memory://convert-test/out", shard_size=32, val_labels=str(labels), **QUIET)
    index = ShardIndex("memory://convert-test/out/val")
    assert len(index) == 8 and len(index.shards) == 1
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]))  # one image without a label
    with pytest.raises(DataError, match=r"ILSVRC2012_val_\d+.JPEG: no label"):
        convert_imagenet(ilsvrc_tree, "memory://convert-test/out2", val_labels=str(labels), **QUIET)


def test_offsets_file_must_match_manifest(shard_copy):
    split = os.path.join(shard_copy, "train")
    np.save(os.path.join(split, "offsets.npy"), np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match=r"offsets.npy: checksum does not match"):
        ShardIndex(split)
    with pytest.raises(DataError, match=r"no webdataset split at .*missing.*manifest.json"):
        ShardIndex(shard_copy)  # DEST itself, not DEST/train


def test_cli_commands(tmp_path, capsys):
    from distreg.cli import main

    assert main(["data", "synth-imagenet", str(tmp_path / "src"), "--classes", "2", "--train-per-class", "3",
                 "--val-per-class", "1", "--min-size", "16", "--max-size", "16"]) == 0
    assert main(["data", "imagenet-to-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--processes", "1"]) == 0
    assert "train: 6 images, val: 2 images; 2 shards written" in capsys.readouterr().out
    assert main(["data", "imagenet-to-shards", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "no train/ or val/ folder" in capsys.readouterr().err
