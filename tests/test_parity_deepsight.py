"""DeepSight against its two public ports, on one fixed input: NEUPs, threshold exceedings,
suspicious flags, bias cosine distances, DDifs, the clusterings, their merge, the accepted
set and the aggregate, with the departures pinned.

The golden numbers come from running each port's DeepSight computation, with its framework
stubbed out and its tensors in float64, on the input of :func:`_input` (hdbscan 0.8.44). Both
ports divide the model's raw outputs; the stubs' model ends in a softmax, so that they divide
probabilities as the paper (and fedsim) does, and every client and the global model see the
same noise sets, passed in:

- FLPoison: github.com/vio1etus/FLPoison, aggregators/deepsight.py (with
  aggregators/aggregator_utils.py's normclipping), commit 368c9403e5dd27775a09af211a7a9d82fbe890ee;
- BackFed: github.com/thinh-dao/BackFed, backfed/servers/deepsight_server.py, commit
  ab3bcbd1a7339f626b3dd9117676d88b6ac1abb5.

Each port was run with its own HDBSCAN settings and with fedsim's (min_cluster_size 2,
min_samples 1), everything else as the port has it.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvg

from strategies.defences.base import clip_to, mean_update
from strategies.defences.deepsight import (
    DeepSight,
    cluster,
    division_differences,
    membership_distances,
    neups,
    suspicious,
    threshold_exceedings,
)
from strategies.defences.flame import cosine_distances
from tests.test_defences import NODE, _configure, _reply

LAYOUT = [("0.weight", (3, 4)), ("0.bias", (3,)), ("2.weight", (5, 3)), ("2.bias", (5,))]
D, P = 35, 5
NUM_SEEDS, NUM_SAMPLES = 3, 64
ATTACKERS = [7, 8, 9]


def _input() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The global model (a 4-3-5 perceptron, 35 parameters), 10 updates and 3 noise sets of
    64 inputs: 7 benign clients spread their output-layer update over the 5 labels, 3
    backdoor clients put theirs on label 0."""
    rng = np.random.default_rng(7)
    start = rng.normal(0.0, 0.5, D)
    updates = []
    for i in range(10):
        body = 0.05 * rng.normal(size=15)
        if i < 7:
            weight = rng.uniform(0.05, 0.15, (5, 3)) * np.sign(rng.normal(size=(5, 3)))
            bias = rng.uniform(0.05, 0.15, 5) * np.sign(rng.normal(size=5))
        else:
            weight = 0.01 * rng.normal(size=(5, 3))
            weight[0] = np.array([0.6, -0.5, 0.7]) + 0.02 * rng.normal(size=3)
            bias = 0.01 * rng.normal(size=5)
            bias[0] = 0.5 + 0.02 * rng.normal()
        updates.append(np.concatenate([body, weight.ravel(), bias]))
    noise = rng.uniform(0.0, 1.0, (NUM_SEEDS, NUM_SAMPLES, 4))
    return start, np.stack(updates), noise


def _arrays(vector: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for key, shape in LAYOUT:
        size = int(np.prod(shape))
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out


class _Dtypes(torch.nn.Module):
    """The identity, noting the dtype of what passes (the model's outputs)."""

    seen: set = set()

    def forward(self, x):
        _Dtypes.seen.add(x.dtype)
        return x


def _model() -> torch.nn.Module:
    """The perceptron in float32, as a model_fn builds it; its keys are LAYOUT's."""
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5), _Dtypes())


class _FixedNoise(DeepSight):
    """DeepSight scoring the fixed noise sets of :func:`_input`."""

    def noise(self, seed_index: int):
        return torch.from_numpy(_input()[2][seed_index])


def _round(**options):
    """One round of DeepSight on the fixed input: the defence, its Updates, the new vector."""
    start, updates, _ = _input()
    defence = _FixedNoise(
        FedAvg(), num_samples=NUM_SAMPLES, batch_size=16, model_fn=_model, input_shape=(4,), **options
    )
    _configure(defence, _arrays(start), len(updates))
    replies = [_reply(NODE + i, _arrays(start + u)) for i, u in enumerate(updates)]
    arrays, _ = defence.aggregate_train(1, replies)
    new = np.concatenate([arrays[key].numpy().ravel() for key, _ in LAYOUT])
    return defence, defence.updates_of(replies), new


def _partition(labels) -> set[frozenset[int]]:
    """Clusters as sets of indices, each noise point alone: the numbering does not matter."""
    labels = np.asarray(labels)
    out = {frozenset(int(i) for i in np.flatnonzero(labels == label)) for label in set(labels.tolist()) - {-1}}
    return out | {frozenset([int(i)]) for i in np.flatnonzero(labels == -1)}


# -- golden numbers ------------------------------------------------------------------------
# fmt: off
# NEUPs of the output layer (FLPoison's get_NEUPs_TEs; BackFed's agree to 1e-16)
NEUPS = np.array([
    [0.19081442920496144, 0.1784317793404026, 0.20606993945143956, 0.27893716144058595, 0.1457466905626104],
    [0.227216461823758, 0.23710726979243393, 0.13940936348856856, 0.22593918772501662, 0.17032771717022285],
    [0.17359691395938767, 0.25103947652168196, 0.20424930105638803, 0.22852256664540524, 0.14259174181713707],
    [0.2053890934044659, 0.2176894256331608, 0.14991654044233463, 0.21814198516309793, 0.2088629553569408],
    [0.2625667809846449, 0.21941112269436383, 0.21876161733900706, 0.16243310479876052, 0.13682737418322363],
    [0.259822573562001, 0.18275713758449533, 0.20586614813795465, 0.15193802006357338, 0.19961612065197565],
    [0.2835463294930033, 0.218114396687834, 0.1939716501255643, 0.10961979424574032, 0.1947478294478581],
    [0.9993915178924088, 0.000229875007626406, 0.00012504985972818755, 0.000152099263138981, 0.00010145797709760048],
    [0.9981992910267344, 0.0007584076588289283, 1.7250859854086742e-05, 0.00023533814781584924, 0.0007897123067667172],
    [0.9994986684766827, 0.00028068740687073627, 5.318211576401077e-05, 6.49622906279091e-05, 0.0001024997100545169],
])
# threshold exceedings (both ports) and the suspicious flags TE <= median / 2 (both)
TES = [5, 5, 5, 5, 5, 5, 5, 1, 1, 1]
SUSPICIOUS = [False] * 7 + [True] * 3
# cosine distances of the output-layer bias updates (FLPoison: sklearn's cosine_distances;
# BackFed's, with 1e-10 added to the norms' product, agree to 2e-9)
COSINE = np.array([
    [0.0, 1.5085344670110576, 1.2699244712329725, 0.0328736718469933, 0.9946320249013935, 0.540815693745198, 0.6382172093238065, 1.5273165223297904, 1.5421188316704162, 1.5549234754621217],
    [1.5085344670110576, 0.0, 1.3768520250514955, 1.2974280109641878, 1.630513083895916, 1.9933199531874792, 1.4056332296208667, 0.469248357587153, 0.4463973310014062, 0.4543773772028671],
    [1.2699244712329725, 1.3768520250514955, 0.0, 1.4803221040741938, 0.3746134910753237, 0.5845945786383472, 1.5053831084500293, 0.7338674699394026, 0.7018688583742523, 0.7125783123317838],
    [0.0328736718469933, 1.2974280109641878, 1.4803221040741938, 0.0, 1.2089660401450264, 0.7542208176192334, 0.6222195016145784, 1.4630355486287292, 1.4808514316641108, 1.4928151281498465],
    [0.9946320249013935, 1.630513083895916, 0.3746134910753237, 1.2089660401450264, 0.0, 0.38856923781989994, 0.9684181317778883, 1.551856279882351, 1.5163204997444242, 1.525288046545624],
    [0.540815693745198, 1.9933199531874792, 0.5845945786383472, 0.7542208176192334, 0.38856923781989994, 0.0, 0.581683654019896, 1.4559817276170892, 1.480413534959181, 1.4711679092091496],
    [0.6382172093238065, 1.4056332296208667, 1.5053831084500293, 0.6222195016145784, 0.9684181317778883, 0.581683654019896, 0.0, 1.5556522747843533, 1.5970403354851817, 1.5772315376554977],
    [1.5273165223297904, 0.469248357587153, 0.7338674699394026, 1.4630355486287292, 1.551856279882351, 1.4559817276170892, 1.5556522747843533, 0.0, 0.0031761485775905207, 0.0011972372880186821],
    [1.5421188316704162, 0.4463973310014062, 0.7018688583742523, 1.4808514316641108, 1.5163204997444242, 1.480413534959181, 1.5970403354851817, 0.0031761485775905207, 0.0, 0.0009629750831456896],
    [1.5549234754621217, 0.4543773772028671, 0.7125783123317838, 1.4928151281498465, 1.525288046545624, 1.4711679092091496, 1.5772315376554977, 0.0011972372880186821, 0.0009629750831456896, 0.0],
])
# DDifs (seed, client, label) by BackFed's formula: the mean of p_client / (p_global + 1e-30)
DDIFS = np.array([
    [
        [0.8514344489820409, 0.8543741111417809, 0.9192558829571655, 1.0490745564875836, 1.1148709147013394],
        [1.259626365805027, 0.993028524432658, 0.9702637924161029, 0.9751748229420494, 0.9544231459297544],
        [1.0143511335697373, 1.0882181759924516, 1.0196221460674795, 1.107956037625172, 0.9107639643117154],
        [0.8800085480284029, 0.8794607822068782, 0.8927270125735152, 1.1097203770388693, 1.0864118798919167],
        [0.8707962690837038, 1.1385815930207368, 1.0860468552982874, 1.1100925089090585, 0.9026668629980631],
        [0.8394422401143364, 1.0007883637839436, 1.0218471089018366, 1.0413471035544677, 1.0198978984986244],
        [0.8583244542373363, 0.8920174011728507, 1.0973275719539899, 0.8982509616030527, 1.0887481745119192],
        [1.5252096153134644, 0.9332575578472228, 0.9244584074143757, 0.9433193592970888, 0.9364076076893098],
        [1.5925596426000994, 0.9356567389486474, 0.9328628280827935, 0.9536806726845273, 0.9098758054343599],
        [1.559103028530062, 0.9435537488299339, 0.9281356433916201, 0.9575311287486751, 0.9165213026803205],
    ],
    [
        [0.8501853066802041, 0.8554352771076188, 0.9188993303688215, 1.0529524789203164, 1.1134932132272044],
        [1.2625638149240215, 0.9893629647569724, 0.9711885826897149, 0.9734317470148195, 0.9551785658804601],
        [1.0121736365152858, 1.0907214915722556, 1.0197848235235523, 1.1049981372102464, 0.9107715165059689],
        [0.8822528479266448, 0.8734118132723173, 0.8940237366201081, 1.104911664538472, 1.0892073023179583],
        [0.8696286935428775, 1.1407049921817882, 1.0857834007908571, 1.1061420616378488, 0.9030601632971286],
        [0.8393479572918852, 1.0016198350543242, 1.020664414674957, 1.0428797622483952, 1.0195040581116463],
        [0.8561290470584728, 0.8943982894571182, 1.0975757283801266, 0.8972302174892238, 1.0892666423800947],
        [1.5200225430789163, 0.9354630669082769, 0.9253495937418703, 0.9409346579193351, 0.9371269965915277],
        [1.585663540771085, 0.9371556979606648, 0.9333042426855347, 0.9524131051038164, 0.9109795278970934],
        [1.553441265655525, 0.9451540185208767, 0.9287156230114992, 0.9559971979878334, 0.9173520838401333],
    ],
    [
        [0.8498418091245044, 0.857242381519514, 0.917373137300264, 1.0565084019856927, 1.1120954729186754],
        [1.2587374635061543, 0.9936881207227786, 0.9701710635654762, 0.9755957562343628, 0.9542043632268431],
        [1.013613015241953, 1.0893698716426383, 1.0189198168016054, 1.108593298754506, 0.9099713918608847],
        [0.8818304995837467, 0.8763253187077812, 0.8930990236307318, 1.111159605321228, 1.086297917335655],
        [0.8718454177551427, 1.1364191054387942, 1.084999359908112, 1.1110342531228807, 0.9025558901537257],
        [0.8374209049329258, 1.0019890206766664, 1.0212868505525867, 1.04150005636865, 1.0201229933366682],
        [0.8573969962036467, 0.8912136288103354, 1.0969878034631297, 0.8983565554640367, 1.0900590138423936],
        [1.5216967181993881, 0.933367207453175, 0.9247354405570478, 0.9456469411373374, 0.9365731143658371],
        [1.5895725781819474, 0.9340529114536037, 0.9326718169750549, 0.9574711555023406, 0.9101357385505942],
        [1.551896437832009, 0.9462305274426865, 0.9287009752840749, 0.9591689974999252, 0.9167422396200753],
    ],
])
# FLPoison divides by p_global + 1e-6: client 0, seed 0
FLPOISON_DDIF_0 = [0.8514267612690416, 0.8543693812554441, 0.9192496371364431, 1.049067704399812, 1.1148681768385025]
# what the ports compute on a model that returns logits (FLPoison's formula), seed 0
LOGIT_DDIF_0 = [1.1901265447937197, 1.532703199826138, 1.1433649260504766, 0.8485121074483986, 1.232227526990278]  # client 0
LOGIT_DDIF_7 = [0.35567173657431994, 0.9872810615485516, 1.0056965889612923, 0.9685906404798782, 1.0193259364296072]  # client 7
# the hdbscan package's labels with fedsim's settings (min_cluster_size=2, min_samples=1;
# the final clustering precomputed with allow_single_cluster, as FLPoison's); the same
# labels in FLPoison's and BackFed's runs
HDBSCAN_COSINE = [1, 0, 2, 1, 2, 2, -1, 0, 0, 0]
HDBSCAN_NEUPS = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
HDBSCAN_DDIFS = [[1, 0, 2, 1, 2, 1, -1, 0, 0, 0]] * 3
HDBSCAN_FINAL = [1, 0, 2, 1, 2, 2, -1, 0, 0, 0]
# FLPoison's merged cluster distances with those labels
MERGED = np.array([
    [0, 2, 2, 0, 2, 1, 2, 3, 3, 3],
    [2, 0, 2, 2, 2, 2, 2, 1, 1, 1],
    [2, 2, 0, 2, 0, 1, 2, 3, 3, 3],
    [0, 2, 2, 0, 2, 1, 2, 3, 3, 3],
    [2, 2, 0, 2, 0, 1, 2, 3, 3, 3],
    [1, 2, 1, 1, 1, 0, 2, 3, 3, 3],
    [2, 2, 2, 2, 2, 2, 0, 3, 3, 3],
    [3, 1, 3, 3, 3, 3, 3, 0, 0, 0],
    [3, 1, 3, 3, 3, 3, 3, 0, 0, 0],
    [3, 1, 3, 3, 3, 3, 3, 0, 0, 0],
]) / 3
# the median of the 10 update norms (FLPoison's clipping bound)
BOUND = 0.5463546528722749
# FLPoison with fedsim's settings accepts the clean clusters and drops the noise point 6
FLPOISON_ACCEPTED = [0, 2, 3, 4, 5]
# with its own settings (hdbscan min_samples=3, min_cluster_size 5) every point of every
# clustering is noise; its distances count noise points as one cluster, so the final
# clustering is one cluster of all, 3 of 10 suspicious (< tau): it accepts everyone
FLPOISON_OWN_SETTINGS_ACCEPTED = list(range(10))
# and the mean of all 10 updates clipped to BOUND
FLPOISON_ALL_AGGREGATE = np.array([
    -0.026844686283913833, -0.0010396439457996808, 0.001793069582630967, -0.002556331390547002,
    0.0016871710021846293, 0.00610023564047347, 0.007876823383136214, -0.02607448665922108,
    -0.02251676140987804, -0.012663132448734762, -0.02155181532851658, 0.0025084997054651815,
    -0.0011130963767488193, 0.013604825883393882, -0.021225202122845628, 0.09464640038445714,
    -0.07018217930330706, 0.11033243887535157, 0.011230420237498043, -0.04029315311379137,
    -0.0061150072232258835, -0.0497855968932031, 0.025145371305506158, -0.001558198919172264,
    0.017816047611327646, -0.009189941396090234, -0.013746594305996335, 0.0019376873589778778,
    -0.009834540106272261, 0.028828020360197576, 0.027838886208745566, -0.012550005757943569,
    0.011971724419536403, 0.03405154882968595, 0.014098972245373945,
])
# BackFed with its own settings: every point noise, kept when not suspicious
BACKFED_OWN_SETTINGS_ACCEPTED = list(range(7))
# BackFed with fedsim's settings: its test compares the fraction of benign members with tau
BACKFED_INVERTED_ACCEPTED = [1, 6, 7, 8, 9]
BACKFED_CLIP_NORM = 0.5416182116720338  # torch.median: the lower of the two middle norms
# P = 200 output neurons with energies 1 / (k + 1.5): FLPoison's TE (NEUPs above
# max(0.01, 1/P) * max) and BackFed's (at least 1/P * max)
TE_FLOOR_FLPOISON, TE_FLOOR_BACKFED = 14, 20
# fmt: on


# -- what fedsim follows -----------------------------------------------------------------
def test_neups_threshold_exceedings_and_flags_as_both_ports():
    _, updates, _ = _round(num_seeds=0)
    weight, bias = updates.part(updates.vectors, "2.weight"), updates.part(updates.vectors, "2.bias")
    neup = neups(weight, bias)
    np.testing.assert_allclose(neup, NEUPS, rtol=1e-13, atol=1e-17)
    assert threshold_exceedings(neup).tolist() == TES
    assert suspicious(threshold_exceedings(neup)).tolist() == SUSPICIOUS


def test_bias_cosine_distances_as_flpoison():
    _, updates, _ = _round(num_seeds=0)
    distances = cosine_distances(updates.part(updates.vectors, "2.bias"))
    assert distances.dtype == np.float64
    np.testing.assert_allclose(distances, COSINE, rtol=1e-13, atol=1e-15)


def test_ddifs_are_ratios_of_probabilities_computed_in_float64():
    _Dtypes.seen.clear()
    defence, updates, _ = _round(num_seeds=0)
    defence.num_seeds = NUM_SEEDS
    ddifs = np.stack(defence.ddifs(updates))
    assert ddifs.dtype == np.float64 and _Dtypes.seen == {torch.float64}  # the models ran in float64
    np.testing.assert_allclose(ddifs, DDIFS, rtol=1e-13)
    # FLPoison's epsilon moves its DDifs by some 1e-5
    np.testing.assert_allclose(ddifs[0, 0], FLPOISON_DDIF_0, rtol=2e-5)
    assert not np.allclose(ddifs[0, 0], FLPOISON_DDIF_0, rtol=1e-6)


def test_division_differences_takes_any_models_and_noise():
    start, updates, noise = _input()
    models = []
    for vector in (start, start + updates[7]):
        model = _model().double()
        model.load_state_dict({key: torch.from_numpy(value) for key, value in _arrays(vector).items()})
        models.append(model.eval())
    got = division_differences(models[0], models[1:], noise[0], batch_size=10)
    np.testing.assert_allclose(got[0], DDIFS[0, 7], rtol=1e-13)


def test_sklearns_hdbscan_partitions_as_the_hdbscan_package_with_fedsims_settings():
    defence, updates, _ = _round(num_seeds=0)
    defence.num_seeds = NUM_SEEDS
    bias = updates.part(updates.vectors, "2.bias")
    neup = neups(updates.part(updates.vectors, "2.weight"), bias)
    ddifs = defence.ddifs(updates)
    labels = {
        "cosine": cluster(cosine_distances(bias), 2, 1, precomputed=True),
        "neups": cluster(neup, 2, 1),
        **{f"ddifs {s}": cluster(ddifs[s], 2, 1) for s in range(NUM_SEEDS)},
    }
    golden = {"cosine": HDBSCAN_COSINE, "neups": HDBSCAN_NEUPS, **{f"ddifs {s}": HDBSCAN_DDIFS[s] for s in range(3)}}
    for name, found in labels.items():
        assert _partition(found) == _partition(golden[name]), name
    # the precomputed clusterings even number the clusters alike; on the NEUPs (Euclidean)
    # the two libraries number the same two clusters the other way round
    assert labels["cosine"].tolist() == HDBSCAN_COSINE
    merged = np.mean(
        [
            membership_distances(labels["cosine"]),
            membership_distances(labels["neups"]),
            np.mean([membership_distances(labels[f"ddifs {s}"]) for s in range(NUM_SEEDS)], axis=0),
        ],
        axis=0,
    )
    np.testing.assert_array_equal(merged, MERGED)  # one noise point per clustering: no difference there
    assert cluster(merged, 2, 1, precomputed=True, single=True).tolist() == HDBSCAN_FINAL


def test_a_round_drops_the_attackers_cluster_and_clips_to_the_median():
    defence, updates, new = _round()
    assert [flag for flag in defence.last_suspicious.values()] == SUSPICIOUS
    assert _partition(list(defence.last_clusters.values())) == _partition(HDBSCAN_FINAL)
    # cluster {1, 7, 8, 9} has 3 suspicious of 4: dropped; {0, 3} and {2, 4, 5} are clean;
    # the noise point 6 is a cluster of one, not suspicious: kept (FLPoison drops it)
    accepted = [node - NODE for node in defence.last_accepted]
    assert accepted == [0, 2, 3, 4, 5, 6] and set(accepted) - {6} == set(FLPOISON_ACCEPTED)
    assert defence.last_bound == BOUND
    start, vectors, _ = _input()
    np.testing.assert_allclose(new - start, mean_update(clip_to(vectors[accepted], BOUND)), rtol=1e-12, atol=1e-16)


def test_with_flpoisons_settings_both_accept_everyone_and_aggregate_alike():
    """min_cluster_size 5 and min_samples 4 (the hdbscan package's 3): with 10 clients every
    clustering is all noise; fedsim's noise points are alone, their distances all 1, and the
    final clustering (one cluster allowed) is one cluster of all, as FLPoison's: 3 suspicious
    of 10 are under tau, so the attackers are accepted. Hence fedsim's default of 2 and 1."""
    defence, updates, new = _round(min_cluster_size=5, min_samples=4)
    ddifs = defence.ddifs(updates)
    bias = updates.part(updates.vectors, "2.bias")
    assert (cluster(cosine_distances(bias), 5, 4, precomputed=True) == -1).all()
    assert (cluster(neups(updates.part(updates.vectors, "2.weight"), bias), 5, 4) == -1).all()
    assert all((cluster(d, 5, 4) == -1).all() for d in ddifs)
    assert [node - NODE for node in defence.last_accepted] == FLPOISON_OWN_SETTINGS_ACCEPTED
    start, vectors, _ = _input()
    # FLPoison's clipping divides by norm + 1e-6, which shrinks a clipped update by some 2e-6
    # of itself here: up to 1e-7 on the aggregate
    np.testing.assert_allclose(new - start, FLPOISON_ALL_AGGREGATE, rtol=0, atol=2e-7)
    np.testing.assert_allclose(new - start, mean_update(clip_to(vectors, BOUND)), rtol=1e-12, atol=1e-16)


# -- departures, pinned --------------------------------------------------------------------
def test_backfeds_inverted_acceptance_is_refused():
    """BackFed accepts a cluster when its fraction of *benign* members is under tau: on the
    same clusters it keeps the attackers' cluster {1, 7, 8, 9} and the noise point 6 and
    drops every clean cluster. fedsim holds the suspicious members against tau."""
    defence, _, _ = _round()
    accepted = [node - NODE for node in defence.last_accepted]
    assert set(ATTACKERS) <= set(BACKFED_INVERTED_ACCEPTED) and not set(ATTACKERS) & set(accepted)
    assert set(accepted) & set(BACKFED_INVERTED_ACCEPTED) == {6}  # the lone benign client, kept by both
    # with its own HDBSCAN settings every point is noise and the inversion never runs: it
    # keeps the clients that are not suspicious
    assert BACKFED_OWN_SETTINGS_ACCEPTED == [i for i, flag in enumerate(SUSPICIOUS) if not flag]
    assert BACKFED_CLIP_NORM < defence.last_bound == BOUND


def test_the_ddifs_are_not_ratios_of_logits():
    defence, updates, _ = _round(num_seeds=0)
    defence.num_seeds = 1
    ddif = defence.ddifs(updates)[0]
    # the attacker's label 0: a probability ratio above 1 (its backdoor label), a logit ratio
    # of 0.36 on the ports' arithmetic
    assert ddif[7, 0] > 1.5 and LOGIT_DDIF_7[0] < 0.4
    assert not np.allclose(ddif[0], LOGIT_DDIF_0, rtol=0.05)


def test_threshold_exceedings_keep_the_floor_of_one_percent():
    energy = 1.0 / (np.arange(200) + 1.5)  # a zero weight update: the energies are the bias's
    neup = neups(np.zeros((1, 200, 1)), energy[None])
    assert threshold_exceedings(neup)[0] == TE_FLOOR_FLPOISON != TE_FLOOR_BACKFED
