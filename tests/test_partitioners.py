"""Every partitioner keeps the contract: disjoint in-range indices, coverage where the
scheme promises it, min_size, reproducibility, skew that falls as alpha grows, and a
ValueError naming the parameter for an impossible request."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioners import (
    IID,
    PARTITIONERS,
    Dirichlet,
    DomainMixture,
    DomainPerClient,
    DriftPartitioner,
    EmbeddingClusters,
    LabelDomainSkew,
    LabelMixture,
    NaturalPartitioner,
    Partition,
    Pathological,
    QuantitySkew,
    Shards,
)
from partitioners.allocation import cut_counts, deal, fill_quotas

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_data(seed: int, n: int, classes: int, domains: int = 4):
    """Labels with every class present, domains, and embeddings in four loose blobs."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    domain_ids = np.concatenate([np.arange(domains), rng.integers(0, domains, n - domains)])
    centres = rng.normal(scale=4.0, size=(4, 3))
    embeddings = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 3))
    return y, domain_ids, embeddings


# name -> (factory(num_clients), deals every sample, has a min_size)
SCHEMES = {
    "iid": (lambda k: IID(k), True, False),
    "dirichlet": (lambda k: Dirichlet(k, alpha=0.5, min_size=3), True, True),
    "dirichlet-balanced": (lambda k: Dirichlet(k, alpha=0.2, min_size=3, balance=True), True, True),
    "pathological": (lambda k: Pathological(k, classes_per_client=2), None, False),
    "shards": (lambda k: Shards(k, shards_per_client=2), True, False),
    "quantity-dirichlet": (lambda k: QuantitySkew(k, alpha=0.3, min_size=3), True, True),
    "quantity-power-law": (lambda k: QuantitySkew(k, "power-law", exponent=1.2, min_size=3), True, True),
    # the authors' size rule ("fit", the default) needs about as many clients as groups
    "label-mixture": (lambda k: LabelMixture(max(k, 6), alpha=1.0, min_size=1), False, True),
    "label-mixture-equal": (lambda k: LabelMixture(k, alpha=0.5, sizes="equal", min_size=3), True, True),
    "embedding": (lambda k: EmbeddingClusters(max(k, 4), alpha=1.0, clusters=4, min_size=1), False, True),
    "embedding-equal": (lambda k: EmbeddingClusters(k, alpha=0.5, clusters=4, sizes="equal", min_size=3), True, True),
    "domain": (lambda k: DomainPerClient(k - k % 4), True, False),
    "domain-mixture": (lambda k: DomainMixture(max(k, 4), beta=1.0, min_size=1), False, True),
    "domain-mixture-equal": (lambda k: DomainMixture(k, beta=0.5, sizes="equal", min_size=3), True, True),
    "domain-lds": (lambda k: LabelDomainSkew(k - k % 4, beta=1.0, min_size=1), False, True),
    # slot 0 of a stream; with 2 classes "reverse" is "shift-1", so two concepts only
    "drift": (lambda k: DriftPartitioner(k, num_slots=3, concepts=["identity", "reverse"]), True, False),
    "natural": (lambda k: NaturalPartitioner(4), True, False),  # the natural groups are make_data's 4 domains
}


def check_disjoint_and_in_range(partition: Partition, n: int) -> np.ndarray:
    dealt = partition.assigned()
    assert dealt.dtype == np.int64
    assert len(np.unique(dealt)) == len(dealt), "a sample was dealt twice"
    assert dealt.size == 0 or (dealt.min() >= 0 and dealt.max() < n)
    return dealt


@pytest.mark.parametrize("name", SCHEMES)
@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(150, 400), classes=st.integers(2, 6), clients=st.integers(4, 9))
def test_partition_contract(name, seed, n, classes, clients):
    factory, covers, has_min_size = SCHEMES[name]
    y, domains, embeddings = make_data(seed, n, classes)
    partitioner = factory(clients)
    partition = partitioner.split(y, domains=domains, embeddings=embeddings, groups=domains, seed=seed)

    assert partition.num_clients == partitioner.num_clients
    dealt = check_disjoint_and_in_range(partition, n)
    if covers is None:  # pathological: every class is held when clients x k >= classes
        covers = partitioner.num_clients * partitioner.classes_per_client >= classes
    if name == "pathological":
        held = (partition.label_matrix() > 0).sum(axis=1)
        assert (held == partitioner.classes_per_client).all(), "every client holds exactly k classes"
    if covers:
        assert len(dealt) == n, "the scheme promises to deal every sample"
    if has_min_size:
        assert partition.sizes.min() >= partitioner.min_size
    again = partitioner.split(y, domains=domains, embeddings=embeddings, groups=domains, seed=seed)
    assert again == partition, "the same seed must give the same split"


def test_every_registered_scheme_is_covered_here():
    tested = {type(factory(8)) for factory, _, _ in SCHEMES.values()}
    assert tested == set(PARTITIONERS.values())


@pytest.mark.parametrize(
    "make, measure",
    [
        (lambda a: Dirichlet(20, alpha=a, min_size=0), "hellinger"),
        (lambda a: LabelMixture(20, alpha=a, min_size=0), "hellinger"),
        (lambda a: EmbeddingClusters(20, alpha=a, clusters=6, min_size=0), "hellinger_cluster"),
        (lambda a: DomainMixture(20, beta=a, min_size=0), "hellinger_domain"),
    ],
)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_growing_concentration_gives_falling_mean_hellinger(make, measure, seed):
    """Hellinger on what the scheme skews: labels, embedding clusters or domains. (The
    mixture schemes' "fit" sizes rarely fit near-uniform mixes: DomainMixture's Dir(beta)
    at beta = 100 fails for most seeds, hence 10 as the top.)"""
    y, domains, embeddings = make_data(seed, 3000, 6, domains=6)
    means = [
        make(a).split(y, domains=domains, embeddings=embeddings, seed=seed).skew().summary[f"mean_{measure}"]
        for a in (0.05, 1.0, 10.0)
    ]
    assert means[0] > means[1] > means[2], means


@pytest.mark.parametrize(
    "build, split_kwargs, parameter",
    [
        (lambda: Dirichlet(10, min_size=50), {}, "min_size"),
        (lambda: Dirichlet(10, alpha=0.0), None, "alpha"),
        (lambda: Dirichlet(10, alpha=float("inf")), None, "alpha"),
        (lambda: IID(401), {}, "num_clients"),
        (lambda: QuantitySkew(401, min_size=0), {}, "num_clients"),
        (lambda: Dirichlet(0), None, "num_clients"),
        (lambda: Dirichlet(10, min_size=-1), None, "min_size"),
        (lambda: Dirichlet(10, alpha=0.01, min_size=39, max_draws=2), {}, "min_size"),
        (lambda: Pathological(4, classes_per_client=7), {}, "classes_per_client"),
        (lambda: Shards(100, shards_per_client=5), {}, "shards_per_client"),
        (lambda: QuantitySkew(10, distribution="zipf"), None, "distribution"),
        (lambda: QuantitySkew(10, min_size=41), {}, "min_size"),
        (lambda: LabelMixture(10, sizes="unequal"), None, "sizes"),
        (lambda: LabelMixture(10, min_size=41), {}, "min_size"),
        (lambda: LabelMixture(6, alpha=100.0, min_size=66, max_draws=50), {}, "sizes"),
        (lambda: LabelMixture(5), {}, "sizes='fit' needs num_clients"),
        (lambda: EmbeddingClusters(4, clusters=401), {"embeddings": True}, "clusters"),
        (lambda: EmbeddingClusters(4), {}, "embeddings"),
        (lambda: EmbeddingClusters(4), {"infinite_embeddings": True}, "embeddings contain infinite"),
        (lambda: EmbeddingClusters(4, embedder="pixel"), None, "embedder"),
        (lambda: EmbeddingClusters(4, embedder_options={"dim": 3}), None, "embedder_options"),
        (lambda: EmbeddingClusters(4, embedder="file"), None, "embedder_options"),
        (lambda: DomainPerClient(6), {"domains": True}, "num_clients"),
        (lambda: DomainPerClient(4), {}, "domains"),
        (lambda: DomainMixture(4, beta=-1.0), None, "beta"),
        (lambda: LabelDomainSkew(5), {"domains": True}, "num_clients"),
    ],
)
def test_impossible_requests_name_the_parameter(build, split_kwargs, parameter):
    y, domains, embeddings = make_data(0, 400, 6)
    with pytest.raises(ValueError, match=parameter):
        partitioner = build()
        assert split_kwargs is not None, "the constructor should have refused"
        infinite = embeddings.copy()
        infinite[7, 1] = np.inf
        inputs = {"domains": domains, "embeddings": embeddings, "infinite_embeddings": infinite}
        partitioner.split(y, **{k.removeprefix("infinite_"): inputs[k] for k in split_kwargs}, seed=0)


def test_balance_gives_equal_sizes_and_keeps_the_class_skew():
    y, _, _ = make_data(1, 2003, 10)
    balanced = Dirichlet(10, alpha=0.1, min_size=0, balance=True).split(y, seed=3)
    assert balanced.sizes.max() - balanced.sizes.min() <= 1
    assert balanced.sizes.sum() == len(y)
    assert balanced.skew().summary["mean_hellinger"] > 0.5, "alpha 0.1 should stay strongly skewed"


def test_pathological_gives_k_classes_per_client():
    y = np.repeat(np.arange(10), 30)
    partition = Pathological(10, classes_per_client=3).split(y, seed=4)
    assert ((partition.label_matrix() > 0).sum(axis=1) == 3).all()
    holders = (partition.label_matrix() > 0).sum(axis=0)
    assert holders.tolist() == [3] * 10, "round-robin dealing holds every class equally often"


def test_pathological_refuses_a_class_smaller_than_its_holders():
    y = np.concatenate([np.repeat(np.arange(4), 50), [4, 4]])  # class 4 has 2 samples
    with pytest.raises(ValueError, match="class 4 has 2 samples.*classes_per_client"):
        Pathological(10, classes_per_client=2).split(y, seed=0)  # 20 slots: 4 holders per class


def test_shards_of_one_class_each_give_shards_per_client_classes():
    y = np.repeat(np.arange(10), 20)  # 10 shards of 20: each shard is exactly one class
    partition = Shards(5, shards_per_client=2).split(y, seed=7)
    assert ((partition.label_matrix() > 0).sum(axis=1) == 2).all()
    assert partition.sizes.tolist() == [40] * 5


def test_quantity_skew_sizes_grow_unequal_as_alpha_falls_and_labels_stay_iid():
    y, _, _ = make_data(2, 5000, 5)
    unequal = QuantitySkew(10, alpha=0.1, min_size=5).split(y, seed=1)
    even = QuantitySkew(10, alpha=1e5, min_size=5).split(y, seed=1)
    assert unequal.skew().summary["gini_sizes"] > 0.4 > 0.05 > even.skew().summary["gini_sizes"]
    assert even.skew().summary["mean_hellinger"] < 0.1


def test_domain_schemes_keep_domains_apart():
    y, domains, _ = make_data(3, 800, 5)
    per_client = DomainPerClient(8).split(y, domains=domains, seed=0)
    domain_matrix = per_client.group_matrix(domains)
    assert ((domain_matrix > 0).sum(axis=1) == 1).all()
    assert (np.argmax(domain_matrix, axis=1) == np.arange(8) // 2).all()
    assert per_client.groups["domain"].tolist() == domains.tolist()
    tenth = DomainPerClient(8, fraction=0.1).split(y, domains=domains, seed=0)
    assert (tenth.group_matrix(domains).sum(axis=0) == np.floor(np.bincount(domains) * 0.1)).all()
    assert set(np.concatenate(tenth.client_indices)) <= set(np.concatenate(per_client.client_indices))
    with pytest.raises(ValueError, match="fraction"):
        DomainPerClient(8, fraction=0)

    lds = LabelDomainSkew(4, beta=0.5, min_size=1).split(y, domains=domains, seed=0)
    kept = lds.group_matrix(domains * 5 + y, 20).reshape(4, 4, 5)  # clients x domains x classes
    assert all(kept[c, d].sum() == 0 for c in range(4) for d in range(4) if c != d)
    # domain d keeps floor(q_cd * n_dc) of class c, and the q_c sum to 1 over the domains
    available = np.bincount(domains * 5 + y, minlength=20).reshape(4, 5)
    shares = kept[np.arange(4), np.arange(4)] / available
    assert (shares.sum(axis=0) <= 1.0 + 1e-9).all()
    assert (shares.sum(axis=0) > 1.0 - 4 / available.min(axis=0)).all()  # at most one sample lost per floor


def test_embedding_split_leaves_out_rows_without_an_embedding():
    y, _, embeddings = make_data(5, 300, 3)
    embeddings[:30] = np.nan
    partition = EmbeddingClusters(5, clusters=4, sizes="equal", min_size=5).split(y, embeddings=embeddings, seed=0)
    dealt = partition.assigned()
    assert len(dealt) == 270 and dealt.min() >= 30
    assert (partition.groups["cluster"][:30] == -1).all()
    assert set(partition.groups["cluster"][30:]) == {0, 1, 2, 3}


def test_fill_quotas_meets_every_quota_without_overdrawing():
    rng = np.random.default_rng(0)
    groups = np.array([50, 5, 0, 45])
    mixes = np.array([[0.0, 1.0, 0.0, 0.0]] * 4 + [[1.0, 0.0, 0.0, 0.0]])  # four clients want group 1
    counts = fill_quotas(groups, np.array([20, 20, 20, 20, 20]), mixes, rng)
    assert counts.sum(axis=0).tolist() == [20] * 5
    assert (counts.sum(axis=1) <= groups).all()
    assert counts[1].sum() == 5


def test_cut_counts_never_gives_a_zero_share_the_rounding_remainder():
    shares = np.array([[1 / 6] * 6 + [0.0] * 3, [0.0] * 8 + [1.0]])  # 6 x 1/6 sums to 0.999...
    counts = cut_counts(shares, np.array([55, 7]))
    assert counts.sum(axis=1).tolist() == [55, 7]
    assert (counts[0, 6:] == 0).all() and (counts[0, :6] >= 9).all()
    assert counts[1].tolist() == [0] * 8 + [7]


def test_deal_refuses_to_overdraw_a_group():
    with pytest.raises(ValueError, match="group 1"):
        deal(np.array([0, 0, 1]), np.array([[1, 1], [2, 0]]), np.random.default_rng(0))


def test_partition_save_and_load_keep_groups(tmp_path):
    y, domains, _ = make_data(6, 200, 4)
    partition = DomainMixture(5, min_size=1).split(y, domains=domains, seed=2)
    partition.save(tmp_path / "p.npz")
    loaded = Partition.load(tmp_path / "p.npz")
    assert loaded == partition
    assert np.array_equal(loaded.groups["domain"], domains)
    assert np.array_equal(loaded.label_matrix(), partition.label_matrix())
    relabelled = Partition(partition.client_indices, y, groups={"domain": (domains + 1) % 4})
    assert relabelled != partition


def test_large_alpha_gives_near_iid_clients():
    y = np.repeat(np.arange(10), 500)
    near_iid = Dirichlet(10, alpha=1e4, min_size=10).split(y, seed=0)
    assert near_iid.skew().summary["mean_hellinger"] < 0.05
    shares = near_iid.label_matrix() / near_iid.sizes[:, None]
    assert np.abs(shares - 0.1).max() < 0.05
    skewed = Dirichlet(10, alpha=0.1, min_size=10).split(y, seed=0)
    assert skewed.skew().summary["mean_hellinger"] > 0.5


class RecordingGenerator:
    """A numpy Generator that remembers the concentration of every Dirichlet draw."""

    def __init__(self, generator):
        self._generator = generator
        self.concentrations = []

    def dirichlet(self, alpha, size=None):
        self.concentrations.append(np.asarray(alpha, dtype=float))
        return self._generator.dirichlet(alpha, size)

    def __getattr__(self, name):
        return getattr(self._generator, name)


@pytest.mark.parametrize("scheme", ["label-mixture", "embedding"])
def test_mixtures_draw_from_dir_alpha_times_the_proportions(scheme, monkeypatch):
    """Dir(alpha * pi), not Dir(alpha * 1): with groups of 70%, 20% and 10% and alpha 2, the
    concentration is (1.4, 0.4, 0.2)."""
    import partitioners.embedding
    import partitioners.mixture

    recorder, make_generator = {}, np.random.default_rng

    def recording_rng(seed):
        recorder["rng"] = RecordingGenerator(make_generator(seed))
        return recorder["rng"]

    y = np.repeat([0, 1, 2], [700, 200, 100])
    embeddings = np.repeat([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]], [700, 200, 100], axis=0)
    embeddings += np.random.default_rng(0).normal(scale=0.1, size=embeddings.shape)
    module = partitioners.mixture if scheme == "label-mixture" else partitioners.embedding
    monkeypatch.setattr(module.np.random, "default_rng", recording_rng)
    if scheme == "label-mixture":
        LabelMixture(5, alpha=2.0, min_size=1).split(y, seed=0)
    else:
        EmbeddingClusters(5, alpha=2.0, clusters=3, min_size=1).split(y, embeddings=embeddings, seed=0)
    drawn = recorder["rng"].concentrations
    assert drawn, "no Dirichlet draw was made"
    assert sorted(drawn[0].round(6).tolist(), reverse=True) == [1.4, 0.4, 0.2]
