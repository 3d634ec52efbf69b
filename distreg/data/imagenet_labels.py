"""ImageNet (ILSVRC-2012) validation labels, in the layouts they are distributed in.

- The official devkit (`ILSVRC2012_devkit_t12/data/`): `ILSVRC2012_validation_ground_truth.txt`
  holds one ILSVRC2012_ID (1..1000) per line, line i for `ILSVRC2012_val_<i:08d>`;
  `meta.mat` maps ILSVRC2012_IDs to WordNet ids (struct array `synsets` with fields
  ILSVRC2012_ID, WNID, words, gloss, num_children, children, wordnet_height,
  num_train_images; the 1000 leaves have num_children 0). ILSVRC2012_IDs are NOT the
  class indices distreg uses (sorted WordNet ids, torchvision's ImageFolder order), so
  both files are needed.
- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString` with
  "n01751748 x1 y1 x2 y2 n01751748 ..." (one wnid and box per object).
- Plain lines "<image name> <wnid | class index>".

`read_val_labels` finds one of them (or reads the one given) and returns
{image stem: class index in the train split's sorted-wnid order}.
"""
from __future__ import annotations

import csv
import io
import posixpath

import fsspec
import numpy as np

from distreg.data.errors import DataError

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
DEVKIT_DIRS = ("ILSVRC2012_devkit_t12/data", "devkit/data", "data", "")
LABEL_FILES = ("LOC_val_solution.csv", "val/LOC_val_solution.csv", "val_labels.txt", "val/val_labels.txt")


def _stem(path: str) -> str:
    return posixpath.basename(path).split(".", 1)[0]


def devkit_wnids(meta: bytes, source: str) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of meta.mat's `synsets` (every synset, leaves and inner)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)}
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise DataError(f"{source}: not an ILSVRC2012 devkit meta.mat (a `synsets` struct array with "
                        f"ILSVRC2012_ID and WNID fields): {e}") from None


def devkit_labels(ground_truth: str, id_to_wnid: dict[int, str], source: str) -> dict[str, str]:
    """{ILSVRC2012_val_<i:08d>: wnid} from the ground-truth lines (line i = image i)."""
    out = {}
    for i, line in enumerate(ground_truth.split(), start=1):
        if not line.isdigit() or int(line) not in id_to_wnid:
            raise DataError(f"{source}: line {i}: {line!r} is not an ILSVRC2012_ID of meta.mat")
        out[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line)]
    return out


def csv_labels(text: str, source: str) -> dict[str, str]:
    """{ImageId: wnid} of a LOC_val_solution.csv (every object of an image has its class)."""
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        objects = (row.get("PredictionString") or "").split()
        wnids = set(objects[::5])
        if not objects or len(objects) % 5 or len(wnids) != 1:
            raise DataError(f"{source}: {row.get('ImageId')}: PredictionString must be 'wnid x1 y1 x2 y2 ...' "
                            f"of one class, got {row.get('PredictionString')!r}")
        out[row["ImageId"]] = objects[0]
    return out


def line_labels(text: str, source: str) -> dict[str, str]:
    out = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            parts = line.split()
            if len(parts) < 2:
                raise DataError(f"{source}: line {n}: expected '<image name> <wnid | class index>'")
            out[_stem(parts[0])] = parts[1]
    return out


def _find_devkit(fs, root: str) -> tuple[str, str] | None:
    for sub in DEVKIT_DIRS:
        folder = posixpath.join(root, sub) if sub else root
        gt, meta = posixpath.join(folder, GROUND_TRUTH), posixpath.join(folder, META)
        if fs.exists(gt):
            if not fs.exists(meta):
                raise DataError(f"{gt}: needs {META} beside it (ILSVRC2012_IDs are not class indices)")
            return gt, meta
    return None


def _read(fs, path: str) -> dict[str, str]:
    """{stem: wnid or class index} of one label file (or devkit folder / ground truth)."""
    if fs.isdir(path):
        found = _find_devkit(fs, path)
        if found is None:
            raise DataError(f"{path}: no {GROUND_TRUTH} in this folder or its data/")
        path = found[0]
    if posixpath.basename(path) == GROUND_TRUTH:
        meta = posixpath.join(posixpath.dirname(path), META)
        if not fs.exists(meta):
            raise DataError(f"{path}: needs {META} beside it (ILSVRC2012_IDs are not class indices)")
        return devkit_labels(fs.cat_file(path).decode(), devkit_wnids(fs.cat_file(meta), meta), path)
    text = fs.cat_file(path).decode()
    return csv_labels(text, path) if text.startswith("ImageId,") else line_labels(text, path)


def read_val_labels(fs, root: str, explicit: str | None, wnid_index: dict[str, int]) -> dict[str, int]:
    """{val image stem: class index}. `explicit`: a label file, a devkit ground-truth file
    or devkit folder (path or URL); else look under `root` for a devkit, then the CSV or
    label lines."""
    if explicit:
        lfs, lpath = fsspec.core.url_to_fs(explicit)
        if not lfs.exists(lpath):
            raise DataError(f"--val-labels: {explicit} does not exist")
        source, labels = explicit, _read(lfs, lpath)
    else:
        devkit = _find_devkit(fs, root)
        candidates = [devkit[0]] if devkit else [p for p in (posixpath.join(root, f) for f in LABEL_FILES)
                                                 if fs.exists(p)]
        if not candidates:
            raise DataError(f"{root}/val holds no class folders and no label file ({GROUND_TRUTH} + {META} of the "
                            f"devkit, {', '.join(LABEL_FILES)}); pass --val-labels")
        source, labels = candidates[0], _read(fs, candidates[0])
    out = {}
    for stem, label in labels.items():
        if label in wnid_index:
            out[stem] = wnid_index[label]
        elif label.isdigit() and int(label) < len(wnid_index):
            out[stem] = int(label)
        else:
            raise DataError(f"{source}: label {label!r} of {stem} is neither a train wnid nor a class index")
    return out
