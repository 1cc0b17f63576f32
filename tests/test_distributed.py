"""Multi-process training with torchrun: DDP over gloo on the CPU, 2 processes."""

import csv
import os
import socket
import subprocess
import sys

import torch
from synthetic import synthetic_dataset, write_image_folder

from cifarlab import distributed
from cifarlab.data import load_dataset
from cifarlab.modelfile import load_model


def test_shards_of_a_permutation_are_disjoint_equal_and_cover_it():
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    shards = [distributed.shard(order, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50  # 101 // 2: one image of the epoch dropped
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert set(torch.cat(shards).tolist()) <= set(order.tolist())
    assert len(set(torch.cat(shards).tolist())) == 100
    assert torch.equal(distributed.shard(order, 0, 1), order)  # one process: the whole permutation


def test_single_process_is_not_distributed():
    assert not distributed.active() and distributed.is_main()
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()  # no-ops


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_one_model(tmp_path):
    ds = synthetic_dataset(n_train_per_class=100, num_classes=4)
    data = tmp_path / "shapes"
    write_image_folder(data, ds)
    cache = tmp_path / "cache"
    load_dataset(data, cache_dir=cache, progress=False)  # decoded once, not by both ranks at once
    env = {**os.environ, "CIFARLAB_HOME": str(cache), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "cifarlab", "train", "--data", str(data),
           "--model", "keras-cnn", "--epochs", "2", "--batch-size", "32", "--device", "cpu",
           "--quiet", "--out", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(tmp_path.rglob("model.safetensors"))) == 1
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    model = load_model(run / "model.safetensors")
    assert model.meta["metrics"]["epochs"] == 2
    assert (model.predict(ds.test_x) == ds.test_y).mean() > 0.6  # chance: 0.25
