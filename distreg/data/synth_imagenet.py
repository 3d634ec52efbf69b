"""A small ImageNet-format tree of real JPEGs, for tests, demos and benchmarks.

Same layout as ILSVRC-2012 (`train/<wnid>/<wnid>_<n>.JPEG`, a flat `val/` with the
Kaggle `LOC_val_solution.csv` or with the official devkit's
`ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt, meta.mat}` (a real
MATLAB file; ILSVRC2012_IDs shuffled against the wnid order, as in the real devkit, plus
inner synsets), or `val/<wnid>/` folders, and `LOC_synset_mapping.txt`),
so it exercises the real converter. Each class has its own colour and stripe
orientation plus noise, so a tiny model can learn it; sizes vary per image, and a few
images are greyscale or CMYK, as in the real ImageNet.
"""
from __future__ import annotations

import io
import posixpath

import fsspec
import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, label: int, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    hue = np.array([np.cos(2 * np.pi * label / num_classes), np.cos(2 * np.pi * (label / num_classes + 1 / 3)),
                    np.cos(2 * np.pi * (label / num_classes + 2 / 3))]) * 90 + 128
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.pi * label / num_classes
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / 3.0)[..., None] * 50
    img = hue[None, None, :] + stripes + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode: str) -> bytes:
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


VAL_LAYOUTS = ("csv", "devkit", "folders")
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")


def devkit_meta(wnids: list[str], ilsvrc_id: dict[str, int], train_per_class: int) -> bytes:
    """A devkit `meta.mat`: the struct array `synsets` (N x 1, the devkit's fields), the
    leaves with their ILSVRC2012_IDs, then two inner synsets (num_children > 0) above them."""
    from scipy.io import savemat

    leaves = sorted(wnids, key=ilsvrc_id.get)
    n = len(leaves)
    half = [np.array([ilsvrc_id[w] for w in leaves[: n // 2]], dtype=np.float64),
            np.array([ilsvrc_id[w] for w in leaves[n // 2 :]], dtype=np.float64)]
    entries = [(float(ilsvrc_id[w]), w, f"synthetic class {wnids.index(w)}", "a synthetic leaf", 0.0,
                np.zeros((1, 0)), 0.0, float(train_per_class)) for w in leaves]
    entries += [(float(n + 1 + j), f"n{8000000 + j:08d}", f"synthetic group {j}", "an inner synset",
                 float(len(kids)), kids, 1.0, float(train_per_class * len(kids))) for j, kids in enumerate(half)]
    synsets = np.empty((len(entries), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for i, entry in enumerate(entries):
        synsets[i, 0] = entry
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def synth_imagenet(dest: str, num_classes: int = 10, train_per_class: int = 8, val_per_class: int = 2,
                   min_size: int = 40, max_size: int = 64, val_layout: str = "csv", seed: int = 0) -> dict[str, int]:
    """Write the tree; returns the number of images per split. `val_layout`: "csv" (flat
    val/ plus LOC_val_solution.csv), "devkit" (flat val/ plus the devkit's ground truth
    and meta.mat) or "folders" (val/<wnid>/)."""
    if val_layout not in VAL_LAYOUTS:
        raise ValueError(f"val_layout must be one of {VAL_LAYOUTS}")
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    rng = np.random.default_rng(seed)
    wnids = [f"n{9000000 + 17 * c:08d}" for c in range(num_classes)]
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(posixpath.join(root, "LOC_synset_mapping.txt"),
                 "".join(f"{w} synthetic class {c}\n" for c, w in enumerate(wnids)).encode())
    n = 0

    def write(path: str, label: int) -> None:
        nonlocal n
        size = tuple(int(v) for v in rng.integers(min_size, max_size + 1, 2))
        mode = {3: "L", 7: "CMYK"}.get(n % 11, "RGB")  # a few greyscale and CMYK JPEGs, as in ImageNet
        fs.pipe_file(path, _jpeg(_image(rng, label, num_classes, size), mode))
        n += 1

    for c, wnid in enumerate(wnids):
        fs.makedirs(posixpath.join(root, "train", wnid), exist_ok=True)
        for i in range(train_per_class):
            write(posixpath.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), c)
    rows = ["ImageId,PredictionString"]
    # ILSVRC2012_IDs of the leaves: a permutation of 1..num_classes (not the wnid order).
    ilsvrc_id = {wnid: int(i) + 1 for wnid, i in zip(wnids, np.random.default_rng(seed + 1).permutation(num_classes))}
    ground_truth = []
    v = 0
    for c, wnid in enumerate(wnids):
        for k in range(val_per_class):
            v += 1
            name = f"ILSVRC2012_val_{v:08d}"
            folder = posixpath.join(root, "val", wnid) if val_layout == "folders" else posixpath.join(root, "val")
            fs.makedirs(folder, exist_ok=True)
            write(posixpath.join(folder, name + ".JPEG"), c)
            rows.append(f"{name},{wnid} 1 1 10 10" + (f" {wnid} 5 5 20 20" if k % 2 else ""))  # 1 or 2 objects
            ground_truth.append(f"{ilsvrc_id[wnid]}\n")
    if val_layout == "csv":
        fs.pipe_file(posixpath.join(root, "LOC_val_solution.csv"), ("\n".join(rows) + "\n").encode())
    if val_layout == "devkit":
        data = posixpath.join(root, "ILSVRC2012_devkit_t12", "data")
        fs.makedirs(data, exist_ok=True)
        fs.pipe_file(posixpath.join(data, "ILSVRC2012_validation_ground_truth.txt"), "".join(ground_truth).encode())
        fs.pipe_file(posixpath.join(data, "meta.mat"), devkit_meta(wnids, ilsvrc_id, train_per_class))
    return {"train": num_classes * train_per_class, "val": num_classes * val_per_class}
