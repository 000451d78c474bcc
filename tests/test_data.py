"""The generator's data stream over a code cache: deterministic and world-size independent."""

import numpy as np
import pytest
import torch

from ar.conditioning.label import LabelSource
from ar.data import BatchStream, CodeCache
from conftest import make_code_cache


def test_cache_reads_codes_variants_and_labels_across_shards(tmp_path):
    cache = CodeCache(make_code_cache(tmp_path / "c", n=48, shard_size=20))
    assert cache.count == 48 and (cache.grid_h, cache.grid_w) == (4, 4) and cache.num_classes == 3
    idx = np.array([45, 3, 21, 19])
    orig = cache.get(idx, np.zeros(4, dtype=np.int64))
    flip = cache.get(idx, np.ones(4, dtype=np.int64))
    assert torch.equal(flip, orig.flip(-1))  # variant 1 is the mirrored image
    raw = np.load(tmp_path / "c" / "codes_00002.npy")
    assert torch.equal(orig[0].flatten(), torch.from_numpy(raw[5, 0].astype(np.int64)))


def test_stream_is_deterministic_and_splits_cleanly_over_ranks(tmp_path):
    cache = CodeCache(make_code_cache(tmp_path / "c", n=48))
    stream = BatchStream(cache, seed=3, cond_dropout=0.25, source=LabelSource(cache))
    codes, cond = stream.batch(40, 16)  # crosses the epoch boundary at 48
    again = BatchStream(cache, seed=3, cond_dropout=0.25, source=LabelSource(cache)).batch(40, 16)
    assert torch.equal(codes, again[0]) and torch.equal(cond.labels, again[1].labels)
    # two ranks taking 8 each see exactly the global batch
    halves = [stream.batch(40 + r * 8, 8) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), codes)
    # each epoch visits every image once
    idx, variants, drop = stream.plan(0, 48)
    assert sorted(idx.tolist()) == list(range(48)) and set(variants.tolist()) <= {0, 1}
    assert not np.array_equal(idx, stream.plan(48, 48)[0])  # a new order each epoch


def test_condition_dropout_uses_the_null_class(tmp_path):
    cache = CodeCache(make_code_cache(tmp_path / "c", n=48))
    _, cond = BatchStream(cache, seed=0, cond_dropout=0.5, source=LabelSource(cache)).batch(0, 480)
    null = (cond.labels == 3).float().mean().item()
    assert 0.4 < null < 0.6
    _, cond = BatchStream(cache, seed=0, cond_dropout=0.0, source=LabelSource(cache)).batch(0, 48)
    assert cond.labels.max() < 3


def test_missing_or_incomplete_cache_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        CodeCache(tmp_path / "nowhere")
    path = make_code_cache(tmp_path / "c")
    (path / "meta.json").unlink()
    with pytest.raises(Exception, match="encode"):
        CodeCache(path)
