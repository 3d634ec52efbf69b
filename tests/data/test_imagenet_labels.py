"""ImageNet val labels from the official devkit (ground truth + a real meta.mat) and from
Kaggle's LOC_val_solution.csv: a hand-checked case through `imagenet-to-shards`, and
synth-imagenet's layouts converting to the same labels."""
from __future__ import annotations

import glob
import os
import tarfile

import numpy as np
import pytest

from distreg.data.errors import DataError
from distreg.data.imagenet_convert import convert_imagenet
from distreg.data.synth_imagenet import devkit_meta, synth_imagenet
from distreg.data.tarshards import ShardIndex

QUIET = {"log": lambda *_: None}
# Real wnids, deliberately NOT in ILSVRC2012_ID order: sorted wnid order gives class
# indices n01440764 -> 0, n01443537 -> 1, n01484850 -> 2.
WNIDS = ["n01440764", "n01443537", "n01484850"]
ILSVRC_ID = {"n01440764": 3, "n01443537": 1, "n01484850": 2}
# Val images 1..4: ground-truth lines (ILSVRC2012_IDs) and, by hand, their class indices.
GROUND_TRUTH = [2, 3, 1, 2]  # -> n01484850, n01440764, n01443537, n01484850
EXPECTED = {"ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 0,
            "ILSVRC2012_val_00000003": 1, "ILSVRC2012_val_00000004": 2}
CSV = ("ImageId,PredictionString\n"
       "ILSVRC2012_val_00000001,n01484850 10 12 30 40\n"
       "ILSVRC2012_val_00000002,n01440764 1 1 20 20 n01440764 5 5 9 9\n"  # two objects of one class
       "ILSVRC2012_val_00000003,n01443537 0 0 8 8\n"
       "ILSVRC2012_val_00000004,n01484850 2 3 4 5\n")


def _val_labels(dest: str) -> dict[str, int]:
    out = {}
    for shard in sorted(glob.glob(os.path.join(dest, "val", "shard-*.tar"))):
        with tarfile.open(shard) as tf:
            out.update({m.name.split(".")[0]: int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")})
    return out


@pytest.fixture
def hand_tree(tmp_path):
    """3 classes x 1 train image, 4 flat val images (copies of a real JPEG)."""
    synth_imagenet(str(tmp_path / "seed"), num_classes=1, train_per_class=1, val_per_class=0, min_size=16, max_size=16)
    jpeg = open(glob.glob(str(tmp_path / "seed/train/*/*.JPEG"))[0], "rb").read()
    root = tmp_path / "ilsvrc"
    for w in WNIDS:
        (root / "train" / w).mkdir(parents=True)
        (root / "train" / w / f"{w}_0.JPEG").write_bytes(jpeg)
    (root / "val").mkdir()
    for name in EXPECTED:
        (root / "val" / f"{name}.JPEG").write_bytes(jpeg)
    return root


def _write_devkit(root, ground_truth=GROUND_TRUTH) -> str:
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "meta.mat").write_bytes(devkit_meta(WNIDS, ILSVRC_ID, train_per_class=1))
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ground_truth))
    return str(data)


def test_devkit_layout_hand_checked(hand_tree, tmp_path):
    from scipy.io import loadmat

    data = _write_devkit(hand_tree)
    # The meta.mat has the devkit's layout: an N x 1 struct array `synsets` with its fields.
    synsets = loadmat(os.path.join(data, "meta.mat"))["synsets"]
    assert synsets.shape == (5, 1) and synsets.dtype.names[:2] == ("ILSVRC2012_ID", "WNID")
    assert {int(s[0]["ILSVRC2012_ID"].item()): s[0]["WNID"].item() for s in synsets[:3]} == \
        {v: k for k, v in ILSVRC_ID.items()}
    dest = str(tmp_path / "out")
    convert_imagenet(str(hand_tree), dest, shard_size=3, **QUIET)  # devkit found under SRC
    assert _val_labels(dest) == EXPECTED
    assert len(ShardIndex(os.path.join(dest, "val"))) == 4
    # Given explicitly: the ground-truth file (meta.mat beside it) or the devkit folder.
    for given in (os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"), str(hand_tree / "ILSVRC2012_devkit_t12")):
        dest = str(tmp_path / f"out-{len(given)}")
        convert_imagenet(str(hand_tree), dest, shard_size=3, val_labels=given, **QUIET)
        assert _val_labels(dest) == EXPECTED


def test_csv_layout_hand_checked(hand_tree, tmp_path):
    (hand_tree / "LOC_val_solution.csv").write_text(CSV)
    dest = str(tmp_path / "out")
    convert_imagenet(str(hand_tree), dest, shard_size=3, **QUIET)
    assert _val_labels(dest) == EXPECTED


def test_bad_devkit_and_csv_are_named(hand_tree, tmp_path):
    data = _write_devkit(hand_tree, [2, 3, 7, 2])  # 7: no such ILSVRC2012_ID
    with pytest.raises(DataError, match=r"ILSVRC2012_validation_ground_truth.txt: line 3: '7' is not an ILSVRC2012_ID"):
        convert_imagenet(str(hand_tree), str(tmp_path / "a"), **QUIET)
    os.remove(os.path.join(data, "meta.mat"))
    with pytest.raises(DataError, match=r"needs meta.mat beside it"):
        convert_imagenet(str(hand_tree), str(tmp_path / "b"), **QUIET)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01484850 1 1 2 2 n01440764 1 1 2 2\n")
    with pytest.raises(DataError, match=r"bad.csv: ILSVRC2012_val_00000001: PredictionString must be .* of one class"):
        convert_imagenet(str(hand_tree), str(tmp_path / "c"), val_labels=str(bad_csv), **QUIET)


def test_synth_imagenet_layouts_convert_to_the_same_labels(tmp_path):
    labels = {}
    for layout in ("csv", "devkit", "folders"):
        src = str(tmp_path / layout)
        synth_imagenet(src, num_classes=5, train_per_class=1, val_per_class=2, min_size=16, max_size=16,
                       val_layout=layout)
        convert_imagenet(src, str(tmp_path / f"{layout}-out"), shard_size=100, **QUIET)
        labels[layout] = _val_labels(str(tmp_path / f"{layout}-out"))
    assert labels["csv"] == labels["devkit"] == labels["folders"]
    assert sorted(labels["csv"].values()) == sorted(np.repeat(np.arange(5), 2).tolist())
    # The synthetic devkit's ILSVRC2012_IDs are shuffled against the wnid order, so the
    # ground truth alone (without meta.mat) would give wrong classes.
    gt = open(tmp_path / "devkit/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read().split()
    assert [int(i) - 1 for i in gt] != [labels["devkit"][k] for k in sorted(labels["devkit"])]
