"""Webdataset shards and the DP-sharded, seeded, prefetching, resumable ShardLoader."""

import json
import os
import tarfile

import pytest
import torch

pytest.importorskip("webdataset")

from rcm_megatron.data.shards import (  # noqa: E402
    INDEX_SUFFIX, ShardDataset, ShardLoader, ShardWriter, is_shard_spec, read_dataset_meta, resolve_shards,
    scan_tar, shard_name, write_dataset_meta, write_negative_context,
)

SHAPE = (4, 2, 4, 4)
TEXT_LEN, TEXT_DIM = 6, 8


def sample(i):
    """Sample i's latents encode i so any read can be checked against its global index."""
    lat = torch.full(SHAPE, float(i))
    ctx = torch.full((1 + i % TEXT_LEN, TEXT_DIM), float(i))
    return lat, ctx


def make_dataset(root, counts, bad=()):
    write_dataset_meta(str(root), {"latent_shape": SHAPE, "text_len": TEXT_LEN, "text_dim": TEXT_DIM,
                                   "latent_dtype": "float32"})
    write_negative_context(str(root), torch.ones(3, TEXT_DIM), "bad quality")
    i = 0
    for s, c in enumerate(counts):
        with ShardWriter(os.path.join(root, shard_name(s)), latent_dtype=torch.float32) as w:
            for _ in range(c):
                lat, ctx = sample(i)
                if i in bad:
                    lat = torch.zeros(4, 2, 4, 5)  # wrong shape
                w.write(f"s{i:06d}", lat, ctx, f"prompt {i}", {"i": i})
                i += 1
    return i


@pytest.fixture
def data(tmp_path):
    n = make_dataset(tmp_path, [7, 5, 9, 3])
    return tmp_path, n


def ids(batch):
    return batch["latents"][:, 0, 0, 0, 0].long().tolist()


def test_layout_and_random_access(data):
    root, n = data
    assert sorted(os.listdir(root)) == sorted(
        ["meta.json", "negative_context.pth"] + [shard_name(s) for s in range(4)]
        + [shard_name(s) + INDEX_SUFFIX for s in range(4)])
    with tarfile.open(root / shard_name(0)) as tf:  # plain webdataset layout
        assert sorted(tf.getnames()[:4]) == ["s000000.context.pth", "s000000.json", "s000000.latents.pth",
                                             "s000000.txt"]
    assert scan_tar(str(root / shard_name(1)))[0][0] == "s000007"
    ds = ShardDataset(str(root))
    assert len(ds) == n == 24 and ds.counts == [7, 5, 9, 3]
    assert ds.latent_shape == SHAPE and ds.text_dim == TEXT_DIM and ds.text_len == TEXT_LEN
    assert ds.negative_context.shape == (TEXT_LEN, TEXT_DIM) and ds.negative_context[3:].abs().sum() == 0
    for i in (0, 6, 7, 23):
        item = ds[i]
        assert item["latents"].shape == SHAPE and float(item["latents"].max()) == i
        ctx = item["context"]
        assert ctx.shape == (TEXT_LEN, TEXT_DIM)
        assert (ctx[: 1 + i % TEXT_LEN] == i).all() and ctx[1 + i % TEXT_LEN:].abs().sum() == 0  # zero padding
        assert item["prompt"] == f"prompt {i}"
    b = ds.batch([3, 20])  # map-style use with the trainer's global_batch_indices
    assert b["index"].tolist() == [3, 20] and b["latents"].shape == (2, *SHAPE)


def test_url_forms(data):
    root, _ = data
    all4 = resolve_shards(str(root))
    assert resolve_shards(str(root / "shard-{000000..000003}.tar")) == all4
    assert resolve_shards(f"{root / shard_name(2)},{root / shard_name(0)}") == [all4[0], all4[2]]
    assert is_shard_spec(str(root)) and is_shard_spec("x/shard-{0..9}.tar") and not is_shard_spec("synthetic")
    assert not is_shard_spec("data.pt")
    with pytest.raises(FileNotFoundError, match="none of the 2 shard file"):
        resolve_shards(str(root / "missing-{0..1}.tar"))
    # sidecar index missing (third-party shards): found by scanning the tar
    os.remove(str(root / shard_name(1)) + INDEX_SUFFIX)
    assert ShardDataset(str(root)).counts == [7, 5, 9, 3]
    assert ShardDataset(str(root))[9]["latents"].max() == 9


def straight(root, dp_size, mbs, gbs, iters, seed=5, content=False, **kw):
    """Per-iteration global batch (list of ids in rank order) read by dp_size loaders;
    ``content``: the ids the latents hold instead of the index (differ only for replaced bad samples)."""
    loaders = [ShardLoader(str(root), r, dp_size, mbs, seed, gbs, **kw) for r in range(dp_size)]
    out = []
    for _ in range(iters):
        batch = []
        for ld in loaders:
            for _ in range(ld.num_micro_batches):
                b = ld.next_batch()
                batch += ids(b) if content else b["index"].tolist()
                if not content:
                    assert b["index"].tolist() == ids(b)  # index = the sample's stable global id
        out.append(batch)
    for ld in loaders:
        ld.close()
    return out


def test_order_is_global_and_layout_invariant(data):
    root, n = data
    one = straight(root, 1, 2, 4, 12)
    # each epoch (24 samples = 6 global batches of 4) is a permutation of all samples
    flat = sum(one, [])
    assert sorted(flat[:24]) == list(range(24)) and sorted(flat[24:48]) == list(range(24))
    assert flat[:24] != flat[24:48] and flat[:24] != list(range(24))  # reshuffled per epoch, shuffled
    # the same global batches under DP=2 and DP=4 (TP/CP/PP peers pass the same dp_rank)
    assert straight(root, 2, 1, 4, 12) == one
    assert straight(root, 4, 1, 4, 12) == one
    assert straight(root, 2, 2, 4, 12) == one
    # the seed changes the order; no shuffle reads in index order
    assert straight(root, 1, 2, 4, 3, seed=6) != one[:3]
    assert sum(straight(root, 1, 4, 4, 2, shuffle=False), []) == list(range(8))
    # a small shuffle window keeps locality: each window of 5 positions is a permutation of 5 consecutive slots
    w = sum(straight(root, 1, 4, 4, 6, shuffle_window=24), [])
    assert sorted(w) == list(range(24))


def test_resume_is_exact(data):
    root, _ = data
    ref = ShardLoader(str(root), 1, 2, 2, 9, 8, prefetch=3)
    want = [ids(ref.next_batch()) for _ in range(10)]
    a = ShardLoader(str(root), 1, 2, 2, 9, 8, prefetch=3)
    got = [ids(a.next_batch()) for _ in range(4)]
    state = a.state_dict()
    assert state["micro_batches_consumed"] == 4 and state["samples_consumed"] == 8 and state["iteration"] == 2
    json.dumps(state)  # plain data for the checkpoint
    a.next_batch()  # read past the checkpoint (and the prefetcher ran further ahead)
    b = ShardLoader(str(root), 1, 2, 2, 9, 8, prefetch=3)
    b.load_state_dict(state)
    got += [ids(b.next_batch()) for _ in range(6)]
    assert got == want
    # restoring into a live loader discards its prefetched batches
    a.load_state_dict(state)
    assert ids(a.next_batch()) == want[4]
    # another DP layout resumes from an iteration boundary: same global batches
    c = [ShardLoader(str(root), r, 4, 1, 9, 8) for r in range(4)]
    for ld in c:
        ld.load_state_dict(state)
    nxt = sum((ids(ld.next_batch()) + ids(ld.next_batch()) for ld in c), [])
    full = straight(root, 1, 8, 8, 4, seed=9)
    assert nxt == full[2]
    # set_iteration is the same position
    d = ShardLoader(str(root), 1, 2, 2, 9, 8)
    d.set_iteration(2)
    assert ids(d.next_batch()) == want[4]
    for ld in (ref, a, b, d, *c):
        ld.close()


def test_resume_refuses_other_data_or_seed(data, tmp_path_factory):
    root, _ = data
    a = ShardLoader(str(root), 0, 1, 2, 9, 4)
    a.next_batch()
    state = a.state_dict()
    with pytest.raises(ValueError, match="seed=9, this run 10"):
        ShardLoader(str(root), 0, 1, 2, 10, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size=4, this run 8"):
        ShardLoader(str(root), 0, 1, 2, 9, 8).load_state_dict(state)
    other = tmp_path_factory.mktemp("other")
    make_dataset(other, [7, 5, 9])
    with pytest.raises(ValueError, match="dataset="):
        ShardLoader(str(other), 0, 1, 2, 9, 4).load_state_dict(state)
    mid = ShardLoader(str(root), 0, 2, 1, 9, 4)
    mid.next_batch()
    with pytest.raises(ValueError, match="mid-iteration"):
        ShardLoader(str(root), 0, 1, 2, 9, 4).load_state_dict(mid.state_dict())
    a.close()
    mid.close()


def test_bad_samples_skipped_counted_and_deterministic(tmp_path, capfd):
    make_dataset(tmp_path, [4, 4], bad={2, 5})
    ds = ShardDataset(str(tmp_path))
    assert float(ds[2]["latents"].max()) == 3  # replaced by the next valid sample
    assert float(ds[5]["latents"].max()) == 6
    assert ds.bad_samples == 2
    err = capfd.readouterr().err
    assert "skipping bad sample" in err and "shard-000000.tar" in err and "latents (4, 2, 4, 5), expected (4, 2, 4, 4)" in err
    # the loader keeps the requested index (the RNG key), reads the replacement and goes on; runs agree
    runs = [straight(tmp_path, 2, 2, 4, 4, seed=3, content=True) for _ in range(2)]
    assert runs[0] == runs[1] and all(2 not in b and 5 not in b for b in runs[0])
    ld = ShardLoader(str(tmp_path), 0, 1, 8, 3, shuffle=False)
    b = ld.next_batch()
    assert b["index"].tolist() == list(range(8)) and ids(b) == [0, 1, 3, 3, 4, 6, 6, 7]
    ld.close()
    # a shard truncated during training: its samples are bad, the others still load
    ds = ShardDataset(str(tmp_path))
    with open(tmp_path / shard_name(1), "r+b") as f:
        f.truncate(700)
    assert float(ds[6]["latents"].max()) == 0  # wraps around to the first valid sample
    # found truncated at start: warned about and counted as empty
    assert ShardDataset(str(tmp_path)).counts == [4, 0]
    assert "shard-000001.tar: unreadable shard" in capfd.readouterr().err


def test_nothing_valid_names_the_data(tmp_path):
    make_dataset(tmp_path, [2], bad={0, 1})
    ld = ShardLoader(str(tmp_path), 0, 1, 1, 0)
    with pytest.raises(RuntimeError, match=f"--data {tmp_path}: no valid sample in 1 shard"):
        ld.next_batch()
    ld.close()


def test_missing_meta_and_negative(tmp_path):
    make_dataset(tmp_path, [2])
    os.remove(tmp_path / "negative_context.pth")
    with pytest.raises(FileNotFoundError, match="negative_context.pth: missing"):
        ShardDataset(str(tmp_path))
    os.remove(tmp_path / "meta.json")
    with pytest.raises(FileNotFoundError, match="meta.json: missing"):
        ShardDataset(str(tmp_path))


def test_writer_is_atomic_and_meta_guards_mixing(tmp_path):
    path = str(tmp_path / shard_name(0))
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write("a", torch.zeros(SHAPE), torch.zeros(2, TEXT_DIM), "p")
            raise RuntimeError("encoder died")
    assert os.listdir(tmp_path) == []  # nothing half-written is left
    with ShardWriter(path) as w:
        w.write("a", torch.randn(SHAPE), torch.randn(2, TEXT_DIM), "p")
    assert sorted(os.listdir(tmp_path)) == [shard_name(0), shard_name(0) + INDEX_SUFFIX]
    write_dataset_meta(str(tmp_path), {"latent_shape": SHAPE, "text_len": 6, "text_dim": 8})
    assert read_dataset_meta(str(tmp_path))["latent_shape"] == list(SHAPE)
    with pytest.raises(ValueError, match="text_dim=8, this run would write 16"):
        write_dataset_meta(str(tmp_path), {"latent_shape": SHAPE, "text_len": 6, "text_dim": 16})


def test_bad_shards_counted_with_their_samples(tmp_path, capfd):
    make_dataset(tmp_path, [4, 4, 4])
    with open(tmp_path / shard_name(1), "r+b") as f:  # truncated: its index recorded 4 samples
        f.truncate(700)
    (tmp_path / shard_name(3)).write_bytes(b"")  # empty file, no index
    ld = ShardLoader(str(tmp_path), 0, 1, 2, 0, shuffle=False)
    assert ld.bad_shards == 2 and ld.bad_samples == 4 and len(ld) == 8
    err = capfd.readouterr().err
    assert "shard-000001.tar: unreadable shard" in err and "shard-000003.tar: unreadable shard" in err
    assert ids(ld.next_batch()) == [0, 1]
    ld.close()


def test_absurd_magnitude_is_a_bad_sample(tmp_path, capfd):
    make_dataset(tmp_path, [4])
    with ShardWriter(os.path.join(tmp_path, shard_name(1)), latent_dtype=torch.float32) as w:
        lat, ctx = sample(4)
        w.write("s000004", lat * 1e30, ctx, "absurd", {})  # finite, but no normalized latent
        lat, ctx = sample(5)
        w.write("s000005", lat, ctx, "fine", {})
    ds = ShardDataset(str(tmp_path))
    assert float(ds[4]["latents"].max()) == 5 and ds.bad_samples == 1
    assert "latent magnitude 4e+30 beyond --max-latent-magnitude 10000" in capfd.readouterr().err
    assert float(ShardDataset(str(tmp_path), max_latent_magnitude=1e31)[4]["latents"].max()) == pytest.approx(4e30)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--max-latent-magnitude .*expected a positive finite number"):
            ShardDataset(str(tmp_path), max_latent_magnitude=bad)


def test_tensor_file_drops_absurd_samples(tmp_path, capfd):
    from rcm_megatron.data import TensorFileLatents

    lat = torch.randn(3, *SHAPE)
    lat[1] *= 1e30
    torch.save({"latents": lat, "context": torch.randn(3, TEXT_LEN, TEXT_DIM),
                "negative_context": torch.zeros(TEXT_LEN, TEXT_DIM)}, tmp_path / "d.pt")
    ds = TensorFileLatents(str(tmp_path / "d.pt"))
    assert len(ds) == 2 and ds.bad_samples == 1 and torch.equal(ds[1]["latents"], lat[2])
    assert "skipping 1 bad sample(s) of 3 (first, sample 1: latent magnitude" in capfd.readouterr().err


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00.garbage" * 50, b"not a pickle at all", b""], ids=["pickle", "text", "empty"])
def test_tensor_file_that_is_not_latents_is_one_clear_error(tmp_path, content):
    from rcm_megatron.data import TensorFileLatents

    (tmp_path / "corrupt.pt").write_bytes(content)
    with pytest.raises(ValueError, match=r"--data .*corrupt\.pt: not readable as a latent file"):
        TensorFileLatents(str(tmp_path / "corrupt.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor\.pt: holds a Tensor; expected a latent file"):
        TensorFileLatents(str(tmp_path / "tensor.pt"))


@pytest.mark.slow
def test_pretrain_with_corrupt_data_file_exits_2_in_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(bytes(range(256)) * 12)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "pretrain_rcm.py"), "--data", str(bad), "--train-iters", "1",
                        "--save", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and str(bad) in lines[0] and "not readable as a latent file" in lines[0], lines
    assert not (tmp_path / "ckpt").exists()
