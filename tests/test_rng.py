"""agm_fast.rng: Philox4x32-10 known answers, keying, statistics, batch-split invariance."""

import numpy as np
import pytest
import torch

from agm_fast import rng

# Random123's known-answer vectors for philox4x32-10 (counter, key → output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = rng.philox4x32(*[torch.tensor(c) for c in ctr], *key)
    assert tuple(int(o) for o in out) == expected


def test_same_key_same_numbers():
    a = rng.normal(7, 3, torch.arange(5), 101, rng.Stream.X0)
    b = rng.normal(7, 3, torch.arange(5), 101, rng.Stream.X0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["seed", "step", "stream", "index"])
def test_different_keys_uncorrelated(change):
    base = dict(seed=1, step=2, stream=rng.Stream.X0, first=0)
    other = dict(base)

    if change == "seed":
        other["seed"] = 2
    elif change == "step":
        other["step"] = 3
    elif change == "stream":
        other["stream"] = rng.Stream.EPS
    else:
        other["first"] = 16
    n = 4096
    a = rng.normal(base["seed"], base["step"], torch.arange(16) + base["first"], n, base["stream"]).flatten()
    b = rng.normal(other["seed"], other["step"], torch.arange(16) + other["first"], n, other["stream"]).flatten()
    corr = float(np.corrcoef(a.numpy(), b.numpy())[0, 1])
    assert abs(corr) < 4 / np.sqrt(a.numel())  # 4 standard errors of a zero correlation


def test_moments_and_normality():
    z = rng.normal(123, 0, torch.arange(64), 4096, rng.Stream.EPS).double().flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / n**0.5
    assert abs(float(z.var()) - 1) < 4 * (2 / n) ** 0.5
    from scipy import stats
    assert stats.kstest(z[:20000].numpy(), "norm").pvalue > 1e-4


def test_uniform_range_and_mean():
    u = rng.uniform(5, 1, torch.arange(10000), rng.Stream.T)[:, 0].double()
    assert float(u.min()) > 0 and float(u.max()) <= 1
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / u.numel()) ** 0.5


def test_split_batches_equal_one_batch():
    """Samples [0, 2b) equal [0, b) then [b, 2b): world size and micro-batching change nothing."""
    b, numel = 6, 3 * 7 * 7  # numel not a multiple of 4: the last block is partly used
    whole = rng.normal(9, 4, torch.arange(2 * b), numel, rng.Stream.X0)
    halves = torch.cat([rng.normal(9, 4, torch.arange(b), numel, rng.Stream.X0),
                        rng.normal(9, 4, torch.arange(b, 2 * b), numel, rng.Stream.X0)])
    assert torch.equal(whole, halves)


def test_prefix_of_longer_row_is_the_same():
    """Element e of a sample does not depend on how many elements are drawn."""
    a = rng.normal(1, 1, torch.arange(3), 10, rng.Stream.X0)
    b = rng.normal(1, 1, torch.arange(3), 4099, rng.Stream.X0)
    assert torch.equal(a, b[:, :10])


def test_bad_seed_and_index():
    with pytest.raises(ValueError, match="seed"):
        rng.normal(-1, 0, torch.arange(2), 4, rng.Stream.X0)
    with pytest.raises(ValueError, match="sample indices"):
        rng.normal(0, 0, torch.tensor([-3]), 4, rng.Stream.X0)
