"""Fixtures of the data tests: one tiny ILSVRC tree and its shards, made once."""
from __future__ import annotations

import pytest

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 12, 2  # 48 train images, 8 val
SHARD_SIZE = 10  # 5 train shards (10, 10, 10, 10, 8)


@pytest.fixture(scope="session")
def ilsvrc_tree(tmp_path_factory) -> str:
    from distreg.data.synth_imagenet import synth_imagenet

    root = str(tmp_path_factory.mktemp("ilsvrc") / "src")
    synth_imagenet(root, num_classes=NUM_CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                   min_size=24, max_size=40)
    return root


@pytest.fixture(scope="session")
def imagenet_shards(ilsvrc_tree, tmp_path_factory) -> str:
    """The converted tree (DEST); splits at DEST/train and DEST/val. Read-only: tests
    that damage shards copy them first (`shard_copy`)."""
    from distreg.data.imagenet_convert import convert_imagenet

    dest = str(tmp_path_factory.mktemp("shards") / "imagenet")
    convert_imagenet(ilsvrc_tree, dest, shard_size=SHARD_SIZE, processes=1, log=lambda *_: None)
    return dest


@pytest.fixture
def shard_copy(imagenet_shards, tmp_path) -> str:
    """A private copy of the converted tree, to damage."""
    import shutil

    dest = str(tmp_path / "imagenet")
    shutil.copytree(imagenet_shards, dest)
    return dest


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (a process, killed by PID at the end)."""
    from tests.data.objectstore import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray2(s3):
    """A two-node Ray cluster (1 CPU each) whose workers reach `s3`: its address. Drivers
    run as subprocesses with RAY_ADDRESS (this process never joins it)."""
    from tests.data.objectstore import two_node_cluster

    cluster = two_node_cluster(s3.env)
    yield cluster.address
    cluster.shutdown()
