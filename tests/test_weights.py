"""The weight shard format: roundtrip, packing and the errors for damaged directories."""

import json

import numpy as np
import pytest

from tapml.errors import WeightsError
from tapml.weights import load_shards, save_shards


def sample_arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        ("a.f32", rng.standard_normal((7, 5)).astype(np.float32)),
        ("b.f16", rng.standard_normal(33).astype(np.float16)),
        ("c.u32", rng.integers(0, 2**32, (3, 4, 2), dtype=np.uint32)),
        ("d.i32", rng.integers(-(2**31), 2**31, 9, dtype=np.int32)),
        ("big", rng.standard_normal((40, 20)).astype(np.float32)),  # 3200 B > shard_bytes
        ("scalar", np.array(1.5, dtype=np.float32)),
        ("empty", np.zeros((0, 3), dtype=np.float16)),
        ("e.f32", rng.standard_normal(100).astype(np.float32)),
    ]


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "params"
    index = save_shards(iter(sample_arrays()), directory, shard_bytes=512)
    return directory, index


def test_roundtrip(saved):
    directory, index = saved
    loaded = load_shards(directory)
    expected = sample_arrays()
    assert list(loaded) == [name for name, _ in expected]
    for name, array in expected:
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert len(index["shards"]) >= 3
    assert json.loads((directory / "index.json").read_text()) == index


def test_packing(saved):
    directory, index = saved
    assert index["format"] == "tapml-weights" and index["version"] == 1
    shards = index["shards"]
    for i, shard in enumerate(shards):
        assert shard["file"] == f"params_shard_{i}.bin"
        assert (directory / shard["file"]).stat().st_size == shard["nbytes"]
    for t in index["tensors"]:
        assert t["offset"] + t["nbytes"] <= shards[t["shard"]]["nbytes"]
    shard_of = {t["name"]: t["shard"] for t in index["tensors"]}
    # The oversize tensor is alone in its shard, and tensors are packed in order.
    assert [t["name"] for t in index["tensors"] if t["shard"] == shard_of["big"]] == ["big"]
    assert [t["shard"] for t in index["tensors"]] == sorted(shard_of.values())


def test_no_temp_files_left(saved):
    directory, index = saved
    names = {p.name for p in directory.iterdir()}
    assert names == {"index.json"} | {s["file"] for s in index["shards"]}


def test_resave_removes_stale_shards(saved):
    directory, _ = saved
    index = save_shards([("x", np.ones(4, np.float32))], directory)
    assert {p.name for p in directory.iterdir()} == {"index.json", "params_shard_0.bin"}
    np.testing.assert_array_equal(load_shards(directory)["x"], np.ones(4, np.float32))
    assert len(index["shards"]) == 1


def test_corrupt_byte(saved):
    directory, _ = saved
    path = directory / "params_shard_1.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="params_shard_1.bin.*sha256.*delete"):
        load_shards(directory)
    load_shards(directory, verify=False)  # size still matches: only the checksum catches it


def test_truncated_shard(saved):
    directory, _ = saved
    path = directory / "params_shard_0.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="params_shard_0.bin.*truncated"):
        load_shards(directory, verify=False)


def test_missing_shard(saved):
    directory, _ = saved
    (directory / "params_shard_2.bin").unlink()
    with pytest.raises(WeightsError, match="params_shard_2.bin.*missing"):
        load_shards(directory)


def test_missing_index(saved):
    directory, _ = saved
    (directory / "index.json").unlink()
    with pytest.raises(WeightsError, match="index.json not found.*delete"):
        load_shards(directory)


def test_bad_index(saved):
    directory, _ = saved
    (directory / "index.json").write_text("{not json")
    with pytest.raises(WeightsError, match="index.json is not a valid"):
        load_shards(directory)


def test_unsupported_dtype_leaves_no_files(tmp_path):
    arrays = [("ok", np.ones(3, np.float32)), ("bad", np.ones(3, np.complex64))]
    with pytest.raises(ValueError, match="complex64"):
        save_shards(arrays, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_arrays_are_aligned(saved):
    directory, _ = saved
    for array in load_shards(directory).values():
        assert array.flags.aligned
