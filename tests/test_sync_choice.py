"""Which state a peer adopts before training (pure function, no network)."""

from __future__ import annotations

from swarmfold.averaging.records import PeerRecord
from swarmfold.daemon.runner import choose_sync_target


def rec(pid: str, rnd: int, model: str, provenance: str = "group", state: str = "training") -> PeerRecord:
    return PeerRecord(peer_id=pid, round=rnd, model_sha256=model, outer_sha256="o", spec_hash="s",
                      client_mode=False, maddrs=[], state=state, metrics={"provenance": provenance})


def choose(records: list[PeerRecord], my_round: int, my_hash: str) -> tuple[int, str] | None:
    t = choose_sync_target({r.peer_id: r for r in records}, me="me", my_round=my_round, my_hash=my_hash)
    return None if t is None else (t.round, t.model_sha256)


def test_a_peer_behind_adopts_the_swarm_state() -> None:
    assert choose([rec("a", 7, "X"), rec("b", 7, "X")], 3, "old") == (7, "X")


def test_a_fresh_joiner_adopts_a_lone_peers_state_when_no_group_state_exists() -> None:
    assert choose([rec("a", 5, "L", provenance="local")], 0, "genesis") == (5, "L")


def test_a_rolled_back_peer_is_never_copied_while_a_group_state_exists() -> None:
    # the attacker rolled back: same round number, its stale model; the honest peer keeps its commit
    assert choose([rec("bad", 9, "A", provenance="local")], 9, "Z") is None
    assert choose([rec("bad", 9, "A", provenance="local"), rec("b", 9, "Z")], 9, "Z") is None


def test_same_round_only_a_strictly_larger_group_replaces_ours() -> None:
    assert choose([rec("a", 4, "A")], 4, "Z") is None  # one against one: keep ours (no hash tie-break)
    assert choose([rec("a", 4, "A"), rec("b", 4, "A")], 4, "Z") == (4, "A")


def test_never_back_a_round_and_ignore_syncing_peers() -> None:
    assert choose([rec("a", 2, "A"), rec("b", 2, "A")], 3, "Z") is None
    assert choose([rec("a", 9, "A", state="syncing")], 3, "Z") is None


def test_same_round_a_local_state_gives_way_one_against_one_by_hash() -> None:
    # both trained alone (a restart, a late sync): exactly one of the two adopts the other's model
    theirs_first = choose_sync_target({"a": rec("a", 4, "A", provenance="local")}, me="me", my_round=4,
                                      my_hash="Z", my_provenance="local")
    assert theirs_first is not None and (theirs_first.round, theirs_first.model_sha256) == (4, "A")
    assert choose_sync_target({"z": rec("z", 4, "Z", provenance="local")}, me="me", my_round=4, my_hash="A",
                              my_provenance="local") is None
    # a local state gives way to a group's at its round; a group's state does not give way to a local one
    t = choose_sync_target({"z": rec("z", 4, "Z")}, me="me", my_round=4, my_hash="A", my_provenance="local")
    assert t is not None and t.model_sha256 == "Z"
    assert choose_sync_target({"a": rec("a", 4, "A", provenance="local")}, me="me", my_round=4, my_hash="Z",
                              my_provenance="group") is None
    # three peers at one round, each with its own model: all converge on the first hash
    recs = {p: rec(p, 4, p.upper(), provenance="local") for p in ("a", "b", "c")}
    for me in recs:
        others = {p: r for p, r in recs.items() if p != me}
        t = choose_sync_target(others, me=me, my_round=4, my_hash=me.upper(), my_provenance="local")
        assert (t is None) == (me == "a") and (t is None or t.model_sha256 == "A")


def test_a_later_round_holding_our_own_model_is_no_progress() -> None:
    # a peer that gave round 0 up (rolled back) is at round 1 with the genesis model: a fresh joiner
    # keeps round 0 (the hostile test's flake: it jumped, and missed the honest peer still at round 0)
    assert choose([rec("gave-up", 1, "genesis", provenance="local")], 0, "genesis") is None
    assert choose([rec("gave-up", 1, "genesis"), rec("b", 1, "genesis")], 0, "genesis") is None
    # a later round with another model is progress, as before
    assert choose([rec("gave-up", 1, "genesis", provenance="local"), rec("a", 2, "X")], 0, "genesis") == (2, "X")


def test_a_lone_peer_waits_only_for_peers_split_from_it_at_its_last_round() -> None:
    from swarmfold.daemon.runner import split_peers
    records = {r.peer_id: r for r in [
        rec("split", 4, "B", provenance="local"),  # at our last round (4) with another base: wait for it
        rec("same", 4, "A"),  # our base: not split from us (a slow peer of our group-to-be); no wait
        rec("paused", 4, "C", state="paused"),  # will not publish round 5 soon
        rec("ahead", 5, "D", provenance="local"),  # already published the round we are at
        rec("behind", 3, "E"),  # further behind: not at our last round
    ]}
    assert split_peers(records, me="me", my_round=5, my_base="A") == {"split"}
    assert split_peers(records, me="split", my_round=5, my_base="B") == {"same"}  # the other side of it
    assert split_peers(records, me="me", my_round=5, my_base=None) == set()  # never trained here: nothing to wait for
    records["split"] = rec("split", 5, "B2", provenance="local")  # it published: the wait is over
    assert split_peers(records, me="me", my_round=5, my_base="A") == set()
