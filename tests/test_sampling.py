"""The sampler: top-k and top-p keep exactly the tokens they should, greedy limits agree with argmax,
and a seed makes a sample repeatable."""
import pytest
import torch

from tinyvila.sampling import Sampler, SamplingParams, sample_rows

VOCAB = 40
DRAWS = 3000


def random_logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=g) * scale


def sampler(seed=0, banned=None, **params):
    return Sampler(SamplingParams(seed=seed, **params), banned)


def draws(logits, n=DRAWS, **params):
    sample = sampler(**params)
    return [sample(logits) for _ in range(n)]


def top_p_kept(logits, top_p, temperature=1.0):
    """By definition: the most likely tokens, fewest first, until their mass reaches top_p."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    mass, kept = 0.0, set()
    for i in order.tolist():
        kept.add(i)
        mass += float(probs[i])
        if mass >= top_p:
            return kept, probs
    return kept, probs


@pytest.mark.parametrize("seed", range(20))
def test_top_k_1_is_greedy(seed):
    logits = random_logits(seed)
    greedy = sampler(temperature=0)(logits)
    assert greedy == int(logits.argmax())
    assert set(draws(logits, n=50, temperature=1.5, top_k=1, seed=seed)) == {greedy}


@pytest.mark.parametrize("seed", range(20))
def test_top_p_keeping_one_token_is_greedy(seed):
    logits = random_logits(seed)
    top_prob = float(logits.softmax(-1).max())
    kept, _ = top_p_kept(logits, top_prob / 2)
    assert kept == {int(logits.argmax())}  # the premise: this top_p keeps one token
    assert set(draws(logits, n=50, temperature=1.0, top_p=top_prob / 2, seed=seed)) == kept


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=8, top_p=0.9)])
def test_a_seeded_sample_repeats(params):
    logits = random_logits(3, scale=1.0)
    first = draws(logits, n=200, seed=1234, **params)
    assert draws(logits, n=200, seed=1234, **params) == first
    assert len(set(first)) > 1  # it really samples
    assert draws(logits, n=200, seed=4321, **params) != first  # and the seed is what fixes it


@pytest.mark.parametrize("k", [2, 5, 13])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_samples_only_the_k_largest(k, temperature):
    logits = random_logits(k, scale=0.5)  # flat enough that every one of the k comes up
    top = set(torch.topk(logits, k).indices.tolist())
    drawn = draws(logits, temperature=temperature, top_k=k, seed=k)
    assert set(drawn) <= top
    assert set(drawn) == top  # and each of them can come up


@pytest.mark.parametrize("top_p", [0.3, 0.55, 0.75, 0.9, 0.97])
@pytest.mark.parametrize("seed", range(4))
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, seed):
    logits = random_logits(100 + seed, scale=1.5)
    kept, probs = top_p_kept(logits, top_p)
    cumulative = probs.sort(descending=True).values.cumsum(-1)
    assert (cumulative - top_p).abs().min() > 1e-5  # no tie at the boundary for float error to settle
    drawn = draws(logits, temperature=1.0, top_p=top_p, seed=seed)
    assert set(drawn) <= kept
    likely = {i for i in kept if probs[i] / probs[list(kept)].sum() > 5 / DRAWS}
    assert likely <= set(drawn)  # each kept token that should come up several times does


def test_top_p_set_by_hand():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    logits = probs.log()
    for top_p, kept in [(0.35, {1}), (0.65, {1, 3}), (0.8, {1, 3, 4}), (0.9, {0, 1, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        assert set(draws(logits, n=1500, temperature=1.0, top_p=top_p)) == kept, top_p


def test_banned_ids_are_never_sampled():
    logits = random_logits(7)
    banned = torch.zeros(VOCAB, dtype=torch.bool)
    banned[logits.topk(3).indices] = True
    assert not banned[sampler(temperature=0, banned=banned)(logits)]
    assert not any(banned[i] for i in draws(logits, n=500, temperature=2.0, banned=banned))


MIXED = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
         dict(temperature=1.0, top_k=8, top_p=0.9), dict(temperature=0)]


def test_a_batch_samples_what_each_row_samples_alone():
    logits = torch.stack([random_logits(50 + b, scale=1.0) for b in range(len(MIXED))])
    batch = [sampler(seed=b, **p) for b, p in enumerate(MIXED)]
    alone = [sampler(seed=b, **p) for b, p in enumerate(MIXED)]
    for _ in range(40):
        assert sample_rows(logits, batch) == [s(row) for s, row in zip(alone, logits)]
    sampled = [sampler(seed=9, temperature=1.0), sampler(seed=10, top_k=3, temperature=2.0)]  # no greedy row
    twins = [sampler(seed=9, temperature=1.0), sampler(seed=10, top_k=3, temperature=2.0)]
    for _ in range(20):
        assert sample_rows(logits[1:3], sampled) == [twins[0](logits[1]), twins[1](logits[2])]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.6, top_p=0.95)])
def test_draws_follow_the_distribution(params):
    logits = random_logits(11, scale=1.0)[:8]
    probs = (logits / params["temperature"]).softmax(-1)
    if "top_p" in params:  # the set top-p keeps, renormalised
        kept, _ = top_p_kept(logits, params["top_p"], params["temperature"])
        probs = torch.tensor([float(probs[i]) if i in kept else 0.0 for i in range(8)])
        probs /= probs.sum()
    n = 20000
    counts = torch.bincount(torch.tensor(draws(logits, n=n, seed=5, **params)), minlength=8).float()
    # 4.5 standard deviations of a binomial count: fails on a wrong distribution, not by chance
    assert ((counts / n - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-9).all(), (counts / n, probs)


def test_the_stream_depends_on_the_seed_and_the_draw_only():
    a, b = sampler(seed=77, temperature=1.0), sampler(seed=77, temperature=0.3, top_k=2)
    assert [a.uniform() for _ in range(50)] == [b.uniform() for _ in range(50)]
    values = [sampler(seed=s, temperature=1.0).uniform() for s in range(2000)]
    assert all(0 <= v < 1 for v in values) and abs(sum(values) / len(values) - 0.5) < 0.02
    assert sampler(seed=-5, temperature=1.0).uniform() == sampler(seed=2 ** 64 - 5, temperature=1.0).uniform()
