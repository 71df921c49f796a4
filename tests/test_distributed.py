"""torchrun: two gloo ranks on the CPU give exactly the single-process figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import DIGITS

from robaudit.distributed import Context, shard

FIGURES = ("classes", "summary", "confusion", "verdict", "sweep")


def test_shards_are_disjoint_and_cover_the_selection():
    indices = np.arange(17) * 3
    parts = [shard(indices, Context(rank, 3, rank)) for rank in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == indices.tolist()
    assert shard(indices, Context()) is indices


def test_two_gloo_ranks_equal_one_process(tmp_path):
    common = ["scan", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "test.npz"),
              "--config", str(DIGITS / "robaudit.toml"), "--steps", "5", "--per-class", "15",
              "--batch-size", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "robaudit", *common, "--json",
                             str(tmp_path / "one.json"), "-q"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 1, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "robaudit", *common, "--json",
                          str(tmp_path / "two.json"), "-q"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 1, two.stderr[-3000:]
    one_doc = json.loads((tmp_path / "one.json").read_text())
    two_doc = json.loads((tmp_path / "two.json").read_text())
    for key in FIGURES:
        assert one_doc[key] == two_doc[key], key
    assert two_doc["data"]["audited"] == 150
    # Rank 0 alone prints: one verdict line, not two.
    assert two.stdout.count("flagged") == 1
