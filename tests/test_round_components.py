"""The round's pieces on their own: typed messages, the timeout budget, membership, the commit's vote
table and judgement, matchmaking's answers, the all-reduce's gate for parts, and the hivemind adapter.

Everything here runs in-process in milliseconds: phase logic is driven by calling the handlers
with in-memory streams (`FakeNet`) and checked by the state it leaves, not by logs or clocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import torch
from conftest import fast_spec

from swarmfold.averaging import wire
from swarmfold.averaging.allreduce import SpanOutcome
from swarmfold.averaging.base import AverageRequest, group_id_for
from swarmfold.averaging.commit import MAX_VOTE_GROUPS, Commit, judge
from swarmfold.averaging.directory import Directory
from swarmfold.averaging.matchmaking import (
    MAX_KNOWN_GROUPS,
    Group,
    Matchmaker,
    Membership,
    NoGroup,
    _Attempt,
)
from swarmfold.averaging.messages import (
    Answer,
    Cancel,
    DirectOffer,
    DirectRequest,
    Final,
    Hello,
    HelloReply,
    PartHeader,
    Propose,
    ReduceError,
    SpanResult,
    StateHeader,
    StateRequest,
    Vote,
    parse_matchmaking,
)
from swarmfold.averaging.protocol import PROPOSE, VOTE, Phase, Rejected
from swarmfold.averaging.records import Declaration, PeerRecord
from swarmfold.averaging.timeouts import RoundTimeouts
from swarmfold.spec import SpecError, spec_from_dict


# ---- an in-process network: requests call the other side's handler over in-memory streams -------------
class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buf += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


class _Info:
    def __init__(self, peer_id: str):
        self.peer_id = peer_id


class FakeNet:
    """The `Net` of one peer: `handlers[peer][proto]` answer its requests."""

    def __init__(self, peer_id: str, handlers: dict[str, dict[str, Any]]):
        self.peer_id = peer_id
        self.handlers = handlers

    async def request(self, peer: str, proto: str, msg: dict[str, Any], *, timeout: float, **_: Any
                      ) -> tuple[dict[str, Any], int, int]:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.pack(msg))
        reader.feed_eof()
        writer = _Writer()
        await self.handlers[peer][proto](_Info(self.peer_id), reader, writer)
        reply = asyncio.StreamReader()
        reply.feed_data(bytes(writer.buf))
        reply.feed_eof()
        answer, n = await wire.recv(reply, 1 << 20)
        return answer, len(wire.pack(msg)), n


def _group(members: list[str], gid: str = "g" * 32) -> Group:
    return Group(round=3, attempt=0, group_id=gid, members=sorted(members), clients=frozenset(), leader=min(members))


# ---- messages ---------------------------------------------------------------------------------------
EXAMPLES = [
    Hello(spec_hash="s", name="n"), HelloReply(ok=True, spec_hash="s", name="n"),
    Propose(round=1, attempt=0, waiting=False, base="b", members=("a", "b"), clients=("b",), spec_hash="s"),
    Final(round=1, attempt=2, waiting=True, members=("a", "b"), clients=(), group_id="g"),
    Cancel(round=1, attempt=0, waiting=False, group_id="g", reason="too_small"), Answer(ok=False, reason="no"),
    PartHeader(group_id="g", spec_hash="s", round=1, base_sha256="b", span=0, numel=4, dtype="int8-absmax",
               weight=2.0, steps=3, payload_bytes=8, chunk=1024, environment={"torch": "2"}),
    SpanResult(group_id="g", span=1, included=("a", "b"), complete=True, rejected={"c": "nonfinite: x"},
               weights={"a": 1.0, "b": 2.0}, steps={"a": 3, "b": 5}),
    ReduceError(reason="unknown group"), Vote(group_id="g", ok=True, digest="d"),
    DirectRequest(proto="p"), DirectOffer(addrs=("127.0.0.1:9",), ticket=b"t" * 16, key=b"k" * 32),
    StateRequest(spec_hash="s"), StateHeader(round=2, model_sha256="m", outer_sha256="o", numel=2,
                                             outer_names=("momentum",), chunk_bytes=8),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_kind_round_trips_through_msgpack(msg: Any) -> None:
    back = type(msg).from_wire(wire.unpack(wire.pack(msg.to_wire())[wire.HEADER_LEN:], 1 << 20))
    assert back == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_missing_or_mistyped_fields_are_malformed(msg: Any) -> None:
    raw = msg.to_wire()
    name = next(k for k in raw if k != "kind")
    for bad, what in [({**raw, "extra": 1}, "unknown field"), ({k: v for k, v in raw.items() if k != name},
                                                                 "missing field"),
                      ({**raw, name: [1]}, name), ({**raw, "kind": "other"}, "expected")]:
        with pytest.raises(Rejected) as e:
            type(msg).from_wire(bad)
        assert e.value.kind.value == "malformed" and what in e.value.detail, (bad, e.value.detail)


def test_numbers_are_checked_by_kind() -> None:
    base = EXAMPLES[6].to_wire()
    for field_, value in [("weight", float("nan")), ("weight", True), ("round", 1.5), ("round", "1")]:
        with pytest.raises(Rejected, match="malformed"):
            PartHeader.from_wire({**base, field_: value})
    assert PartHeader.from_wire({**base, "weight": 3}).weight == 3.0  # an integer weight is a number
    with pytest.raises(Rejected, match="cancel reason"):
        Cancel.from_wire({**EXAMPLES[4].to_wire(), "reason": "because"})
    assert isinstance(parse_matchmaking(EXAMPLES[3].to_wire()), Final)
    with pytest.raises(Rejected, match="unknown matchmaking message kind"):
        parse_matchmaking({"kind": "vote"})
    assert len(Answer.from_wire({"kind": "answer", "ok": False, "reason": "x" * 10_000}).reason) == 500


# ---- the timeout budget ---------------------------------------------------------------------------------
def test_round_timeouts_are_derived_from_the_spec_in_one_place() -> None:
    spec = fast_spec(averaging={"matchmaking_timeout": 10.0, "join_timeout": 3.0, "allreduce_timeout": 7.0,
                                "commit_timeout": 2.0}, network={"dht_timeout": 4.0, "state_sync_timeout": 50.0})
    t = RoundTimeouts.from_spec(spec)
    assert (t.matchmaking, t.join, t.allreduce, t.commit, t.dht, t.state_sync) == (10.0, 3.0, 7.0, 2.0, 4.0, 50.0)
    assert t.gather_window(0) == 10.0 and t.gather_window(1, survivors=False) == t.lone_retry_window == 6.0
    # a retry waits for its survivors as long as one may still be inside the failed attempt
    assert t.gather_window(1) == t.retry_window == t.attempt_budget + 3.0
    assert t.attempt_budget == 3 * 7.0 + 2 * 2.0 + 2 * 3.0  # the bound the round used before, now named
    assert t.span_exchange == 14.0 and t.state_sync_total == 100.0 and t.dht_call > t.dht
    bounds = t.phase_bounds()
    assert bounds["all-reduce + commit (safety net)"] >= bounds["all-reduce"] + bounds["commit"]


def test_local_settings_are_outside_the_swarm_id() -> None:
    spec = fast_spec()
    assert spec.replace(network={"state_sync_timeout": 999.0, "poll_interval": 1.0}).spec_hash == spec.spec_hash


def test_an_old_spec_with_state_sync_timeout_in_averaging_still_loads(caplog: pytest.LogCaptureFixture) -> None:
    raw = fast_spec().to_dict()
    raw["averaging"]["state_sync_timeout"] = 77.0
    raw["network"].pop("state_sync_timeout")
    with caplog.at_level(logging.WARNING, logger="swarmfold.spec"):
        spec = spec_from_dict(raw, "old.toml")
    assert spec.network.state_sync_timeout == 77.0 and spec.spec_hash == fast_spec().spec_hash
    assert "old.toml: averaging.state_sync_timeout is deprecated" in caplog.text and "[network]" in caplog.text
    raw["averaging"]["state_sync_timeout"] = -1.0
    with pytest.raises(SpecError, match="network.state_sync_timeout"):
        spec_from_dict(raw, "old.toml")


# ---- membership and the commit ------------------------------------------------------------------------------
def test_membership_is_bounded_and_knows_pending_members() -> None:
    m = Membership()
    for i in range(MAX_KNOWN_GROUPS + 5):
        m.register(_group(["a", "b"], gid=f"{i:032d}"))
    assert m.members_of(f"{0:032d}") is None and m.is_member("a", f"{MAX_KNOWN_GROUPS + 4:032d}")
    assert not m.is_member("c", f"{MAX_KNOWN_GROUPS + 4:032d}") and not m.may_become_member("c")
    m.set_pending(frozenset({"c"}))
    assert m.may_become_member("c")


def _commits(members: list[str]) -> tuple[dict[str, Commit], Membership]:
    handlers: dict[str, dict[str, Any]] = {}
    t = RoundTimeouts.from_spec(fast_spec(averaging={"commit_timeout": 5.0}))
    out = {}
    for p in members + ["x"]:
        m = Membership()
        m.register(_group(members))
        out[p] = Commit(FakeNet(p, handlers), m, t, on_enter=lambda phase, r, level: None)
        handlers[p] = {VOTE: out[p].on_vote}
    return out, m


def _outcome(included: list[str], digest: str = "d") -> SpanOutcome:
    return SpanOutcome(included=included, weights={p: 1.0 for p in included}, steps={p: 5 for p in included},
                       complete=True, rejected={},
                       digest=digest)


def test_votes_from_outside_the_group_are_refused_and_tables_stay_bounded() -> None:
    commits, _ = _commits(["a", "b"])

    async def go() -> list[dict[str, Any]]:
        x = commits["x"]  # not a member: every vote it sends is refused
        answers = [(await x.net.request("a", VOTE, Vote(group_id=gid, ok=False, digest="z").to_wire(),
                                        timeout=1))[0] for gid in ["g" * 32] + [f"{i:032d}" for i in range(50)]]
        answers.append((await x.net.request("a", VOTE, {"kind": "vote", "group_id": 1},
                                            timeout=1))[0])
        return answers

    answers = asyncio.run(go())
    assert all(not r["ok"] for r in answers) and "malformed" in answers[-1]["reason"]
    assert commits["a"].votes == {}, "nothing stored for a non-member"
    for i in range(MAX_VOTE_GROUPS + 3):  # a member's votes for many groups of ours: bounded too
        g = _group(["a", "b"], gid=f"{i:032d}")
        commits["a"].membership.register(g)
        assert commits["a"]._record("b", Vote(group_id=g.group_id, ok=True, digest="d"))
    assert len(commits["a"].votes) == MAX_VOTE_GROUPS


def test_members_commit_on_agreeing_digests_and_not_otherwise() -> None:
    commits, _ = _commits(["a", "b"])
    g = _group(["a", "b"])
    same = judge(g, "a", [_outcome(["a", "b"]), _outcome(["a", "b"])])

    async def both(jb: Any) -> tuple[tuple[bool, list[str]], tuple[bool, list[str]]]:
        stats = {"sent": 0, "received": 0}
        ra, rb = await asyncio.gather(commits["a"].commit(g, 3, same, dict(stats)), commits["b"].commit(g, 3, jb, stats))
        return ra, rb

    assert asyncio.run(both(judge(g, "b", [_outcome(["a", "b"]), _outcome(["a", "b"])]))) == ((True, ["b"]),
                                                                                               (True, ["a"]))
    commits, _ = _commits(["a", "b"])
    other = judge(g, "b", [_outcome(["a", "b"], "e"), _outcome(["a", "b"])])
    assert asyncio.run(both(other)) == ((False, []), (False, []))


def test_judge_names_what_went_wrong() -> None:
    g = _group(["a", "b"])
    assert judge(g, "a", [_outcome(["a", "b"]), None]).failure.startswith("no aggregate from reducer")
    assert judge(g, "a", [_outcome(["a", "b"]), None]).missing == {"b"}
    assert judge(g, "a", [_outcome(["a", "b"]), _outcome(["a"])]).failure == "reducers included different contributors"
    assert judge(g, "a", [_outcome(["b"]), _outcome(["b"])]).failure == "our own contribution was rejected"
    cut = SpanOutcome(included=["a", "b"], weights={"a": 1.0, "b": 1.0}, steps={"a": 5, "b": 5}, complete=False,
                      rejected={"c": "x"},
                      digest="")
    j = judge(g, "a", [_outcome(["a", "b"]), cut])
    assert "cut off" in j.failure and j.rejected == {"c": "x"} and j.digest == ""
    ok = judge(g, "a", [_outcome(["a", "b"]), _outcome(["a", "b"])])
    assert not ok.failure and len(ok.digest) == 64


# ---- matchmaking's answers -------------------------------------------------------------------------------
def _matchmaker(me: str) -> Matchmaker:
    spec = fast_spec(averaging={"group_size": 3})
    return Matchmaker(FakeNet(me, {}), None, spec, RoundTimeouts.from_spec(spec),  # type: ignore[arg-type]
                      client_mode=False, maddrs=lambda: [], stopping=threading.Event(),
                      on_phase=lambda p, d: None, on_enter=lambda p, r, level: None)


def test_a_follower_accepts_one_proposal_and_a_final_list_that_matches_it() -> None:
    async def go() -> None:
        mm = _matchmaker("b")
        a = _Attempt(round=3, attempt=1, base="B", excluded={"z"})
        a.final = asyncio.get_running_loop().create_future()
        mm._attempt = a
        prop = dict(round=3, attempt=1, waiting=False, base="B", members=("a", "b"), clients=(), spec_hash="s")
        assert mm.consider("a", Propose(**{**prop, "attempt": 2})) == (False, "not at this round/attempt")
        assert mm.consider("b", Propose(**prop))[1] == "malformed proposal"  # the proposer is not the smallest
        assert mm.consider("a", Propose(**{**prop, "base": "C"}))[1] == "different base model"
        assert mm.consider("a", Propose(**{**prop, "members": ("a", "b", "z")}))[1].startswith("proposal includes")
        assert mm.consider("a", Propose(**prop)) == (True, "")
        assert mm.consider("a", Propose(**prop))[1] == "already in a group"
        assert mm.membership.may_become_member("a") and not mm.membership.may_become_member("c")
        gid = group_id_for(mm.swarm_id, 3, 1, ["a", "b"])
        final = Final(round=3, attempt=1, waiting=False, members=("a", "b"), clients=(), group_id=gid)
        assert mm.consider("c", final)[1] == "no pending proposal from you"
        assert mm.consider("a", final) == (True, "")
        assert a.final.result() == final and mm.membership.is_member("a", gid)

    asyncio.run(go())


def test_a_final_list_with_a_wrong_group_id_or_new_members_is_refused() -> None:
    async def go() -> None:
        for members, gid in [(("a", "b"), "0" * 32), (("a", "b", "c"), None)]:
            mm = _matchmaker("b")
            a = _Attempt(round=3, attempt=0, base="B", excluded=set(), waiting=True)
            a.final = asyncio.get_running_loop().create_future()
            mm._attempt = a
            assert mm.consider("a", Propose(round=3, attempt=5, waiting=True, base="B", members=("a", "b"),
                                            clients=(), spec_hash="s")) == (True, ""), "any attempt in the waiting room"
            gid = gid or group_id_for(mm.swarm_id, 3, 0, list(members), waiting=True)
            final = Final(round=3, attempt=0, waiting=True, members=members, clients=(), group_id=gid)
            assert mm.consider("a", final) == (False, "malformed final list")
            assert isinstance(a.final.result(), Cancel) and mm.membership.members_of(gid) is None

    asyncio.run(go())


def test_the_waiting_room_has_its_own_group_ids() -> None:
    assert group_id_for("s", 3, 0, ["a", "b"]) != group_id_for("s", 3, 0, ["a", "b"], waiting=True)
    assert group_id_for("s", 3, 0, ["a", "b"], waiting=True) == group_id_for("s", 3, 7, ["b", "a"], waiting=True)


# ---- the all-reduce's gate: parts only from members of our groups -------------------------------------------
def test_a_reducer_refuses_parts_for_groups_it_is_not_in_at_once() -> None:
    from swarmfold.averaging.allreduce import AllReduce
    from swarmfold.averaging.directory import Directory

    spec = fast_spec(averaging={"join_timeout": 30.0})

    async def go() -> None:
        m = Membership()
        net = FakeNet("a", {})
        ar = AllReduce(net, Directory.__new__(Directory), m, spec, RoundTimeouts.from_spec(spec),
                       make_part=lambda *a: {}, on_enter=lambda p, r, level: None, loop=asyncio.get_running_loop())
        ar.dir.denied = set()
        t0 = asyncio.get_running_loop().time()
        assert await ar._reducer_for("x", "f" * 32) is None  # a stranger: refused without waiting
        assert asyncio.get_running_loop().time() - t0 < 1.0
        m.set_pending(frozenset({"a", "b"}))  # b is in the proposal we accepted: it may wait for our reducer
        waiting = asyncio.ensure_future(ar._reducer_for("b", "g" * 32))
        await asyncio.sleep(0)
        assert not waiting.done()
        req = AverageRequest(round=3, delta=__import__("torch").zeros(4096), weight=1.0, model_sha256="B", steps=1)
        red = ar._open_reducer(req, _group(["a", "b"]), (0, 4096), 0)
        assert await asyncio.wait_for(waiting, 5) is red
        ar.shutdown()

    asyncio.run(go())


def test_a_subclass_sees_every_phase_it_enters() -> None:
    assert [p.value for p in Phase] == ["matchmaking", "send", "reduce", "commit"]


# ---- the hivemind adapter: fail loudly when an upgrade moves a private attribute ----------------------------
def test_hivemind_still_has_the_private_attributes_the_adapter_uses() -> None:
    import inspect

    from cryptography.hazmat.primitives.asymmetric import rsa
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings.p2pclient import Client
    from hivemind.utils.crypto import RSAPrivateKey

    from swarmfold.averaging import hivemind_adapter as ad

    assert f"self.{ad.P2P_CLIENT} = await p2pclient.Client.create(" in inspect.getsource(P2P), \
        f"hivemind's P2P no longer keeps its daemon client in {ad.P2P_CLIENT}"
    assert list(inspect.signature(Client.connect).parameters) == ["self", "peer_id", "maddrs"], \
        "the daemon client's connect(peer_id, maddrs) changed"
    key = RSAPrivateKey()
    assert isinstance(getattr(key, ad.RSA_INNER_KEY), rsa.RSAPrivateKey), \
        f"hivemind's RSAPrivateKey no longer wraps a cryptography key in {ad.RSA_INNER_KEY}"
    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    validator = ad.signature_validator(mine)
    assert validator.local_public_key  # it signs with our key

    async def reader_limit() -> None:
        reader = asyncio.StreamReader()
        assert isinstance(getattr(reader, ad.READER_LIMIT), int), f"asyncio's StreamReader lost {ad.READER_LIMIT}"
        assert ad.widen_reader(reader, 1 << 22) and getattr(reader, ad.READER_LIMIT) == 1 << 22

    asyncio.run(reader_limit())


# ---- matchmaking's moved-on rule: when a waiting peer gives its round up -----------------------------------
class _RecordsOnly(Directory):
    """The directory's own record logic over a fixed set of records; nobody ever declares."""

    def __init__(self, me: str, spec: Any, recs: list[PeerRecord]):  # no transport: nothing reaches a DHT
        self.peer_id, self.spec, self.swarm_id, self._recs = me, spec, spec.swarm_id, recs

    async def records(self) -> dict[str, PeerRecord]:
        return {r.peer_id: r for r in self._recs}

    async def declare(self, *args: Any) -> None:
        pass

    async def declared(self, *args: Any) -> dict[str, Any]:
        return {}


def _waiting_outcome(recs: list[tuple[str, int]], *, for_cause: set[str] = frozenset()) -> tuple[bool, int]:
    """Run one waiting peer ("me", round 3, min_group_size 2) against `recs` [(peer, round)]; after three
    waits it is stopped. (moved on?, how many times it waited)."""
    spec = fast_spec(averaging={"min_group_size": 2, "group_size": 3, "matchmaking_timeout": 0.05},
                     network={"poll_interval": 0.01})
    records = [PeerRecord(peer_id=p, round=r, model_sha256="m", outer_sha256="o", spec_hash=spec.spec_hash,
                          client_mode=False, maddrs=[], state="training") for p, r in recs]
    stopping, waits = threading.Event(), []

    def on_phase(phase: str, detail: str) -> None:
        if "waiting for a group" in detail:
            waits.append(detail)
            if len(waits) == 3:
                stopping.set()

    mm = Matchmaker(FakeNet("me", {}), _RecordsOnly("me", spec, records), spec, RoundTimeouts.from_spec(spec),
                    client_mode=False, maddrs=lambda: [], stopping=stopping, on_phase=on_phase,
                    on_enter=lambda p, r, level: None)
    req = AverageRequest(round=3, delta=torch.zeros(4), weight=1.0, model_sha256="m", steps=1)
    out = asyncio.run(mm.matchmake(req, 0, set(for_cause), set(), set(for_cause)))
    assert isinstance(out, NoGroup)
    return out.moved_on, len(waits)


def test_a_waiting_peer_follows_a_swarm_that_moved_past_its_round() -> None:
    assert _waiting_outcome([("a", 4)]) == (True, 1)  # one past, nobody else here: the round is over
    assert _waiting_outcome([("a", 4), ("b", 4), ("c", 3)]) == (True, 1)  # two past, two here


def test_one_peer_ahead_does_not_end_a_round_others_are_still_at() -> None:
    # the hostile test's flake: a peer that gave round 3 up alone is one record ahead, while an honest
    # peer is still at round 3; the waiting peer stays for it (it is stopped after three waits)
    assert _waiting_outcome([("gave-up", 4), ("honest", 3)]) == (False, 3)


def test_a_peer_rejected_for_cause_does_not_count_as_the_swarm() -> None:
    assert _waiting_outcome([("attacker", 4)], for_cause={"attacker"}) == (False, 3)
    assert _waiting_outcome([("attacker", 4), ("a", 4)], for_cause={"attacker"}) == (True, 1)


def test_late_peers_do_not_pair_up_at_a_round_the_swarm_has_left() -> None:
    """Two late peers meet in round 3's waiting room (a group of min_group_size 2 could form) while three
    are past round 3: they give the round up for the catch-up instead of committing a model of their
    own that the swarm would throw away. "me" would lead that pair; its net answers nobody, so a
    proposal would raise here."""
    spec = fast_spec(averaging={"min_group_size": 2, "group_size": 3, "matchmaking_timeout": 0.05},
                     network={"poll_interval": 0.01})
    records = [PeerRecord(peer_id=p, round=r, model_sha256="m", outer_sha256="o", spec_hash=spec.spec_hash,
                          client_mode=False, maddrs=[], state="training")
               for p, r in [("zz-late", 3), ("a", 4), ("b", 4), ("c", 4)]]

    class WaitingRoom(_RecordsOnly):
        async def declared(self, round_idx: int, attempt: int, waiting: bool, level: int = 1) -> dict[str, Any]:
            return {"zz-late": Declaration("zz-late", "m", False, [])} if waiting else {}

    mm = Matchmaker(FakeNet("me", {}), WaitingRoom("me", spec, records), spec, RoundTimeouts.from_spec(spec),
                    client_mode=False, maddrs=lambda: [], stopping=threading.Event(), on_phase=lambda p, d: None,
                    on_enter=lambda p, r, level: None)
    req = AverageRequest(round=3, delta=torch.zeros(4), weight=1.0, model_sha256="m", steps=1)
    out = asyncio.run(asyncio.wait_for(mm.matchmake(req, 0, set(), set(), set()), 30))
    assert out == NoGroup(moved_on=True)


class _SharedDeclarations(_RecordsOnly):
    """Several matchmakers' directory: one in-memory table of declarations, every peer at round 3."""

    def __init__(self, me: str, spec: Any, table: dict[tuple[int, int, bool, int], dict[str, Declaration]],
                 peers: list[str]):
        recs = [PeerRecord(peer_id=p, round=3, model_sha256="m", outer_sha256="o", spec_hash=spec.spec_hash,
                           client_mode=False, maddrs=[], state="training") for p in peers]
        super().__init__(me, spec, recs)
        self.table = table

    async def declare(self, decl: Declaration, round_idx: int, attempt: int, waiting: bool, ttl: float,
                      level: int = 1) -> None:
        self.table.setdefault((round_idx, attempt, waiting, level), {})[decl.peer_id] = decl

    async def declared(self, round_idx: int, attempt: int, waiting: bool, level: int = 1) -> dict[str, Any]:
        return dict(self.table.get((round_idx, attempt, waiting, level), {}))


def test_a_retry_waits_for_a_survivor_still_finishing_the_failed_attempt() -> None:
    """The cheater test's lost round (stop 23): after rejecting a member, the fast survivor "b" retried at
    once, while its leader-to-be "a" (a reducer replaying the members' rounds on loaded cores) was still
    inside the failed attempt. "b" gathered for 2 x join, waited its grace for a proposal, gave up on "a"
    and excluded it: both lost the round. Now a retry waits for the survivors it expects for as long as
    one can still be inside the failed attempt, and both end in one group. "a" comes here after four
    times the old wait (2 x join to gather + 2 x join of grace)."""
    spec = fast_spec(averaging={"group_size": 3, "join_timeout": 0.05, "allreduce_timeout": 1.0,
                                "commit_timeout": 0.2}, network={"poll_interval": 0.01})
    tt = RoundTimeouts.from_spec(spec)
    late = 4 * (tt.lone_retry_window + tt.leader_grace)
    assert late < tt.retry_window
    handlers: dict[str, dict[str, Any]] = {}
    table: dict[tuple[int, int, bool, int], dict[str, Declaration]] = {}

    def matchmaker(me: str) -> Matchmaker:
        mm = Matchmaker(FakeNet(me, handlers), _SharedDeclarations(me, spec, table, ["a", "b"]), spec, tt,
                        client_mode=False, maddrs=lambda: [], stopping=threading.Event(),
                        on_phase=lambda p, d: None, on_enter=lambda p, r, level: None)
        handlers[me] = {PROPOSE: mm.on_propose}
        return mm

    req = AverageRequest(round=3, delta=torch.zeros(4), weight=1.0, model_sha256="m", steps=1)
    a, b = matchmaker("a"), matchmaker("b")

    async def slow_survivor() -> Group | NoGroup:
        await asyncio.sleep(late)  # still replaying in attempt 0
        return await a.matchmake(req, 1, {"cheater"}, {"b"})

    async def go() -> tuple[Group | NoGroup, Group | NoGroup]:
        return await asyncio.wait_for(asyncio.gather(slow_survivor(), b.matchmake(req, 1, {"cheater"}, {"a"})), 30)

    ga, gb = asyncio.run(go())
    assert isinstance(ga, Group) and isinstance(gb, Group), (ga, gb)
    assert ga.group_id == gb.group_id and ga.members == gb.members == ["a", "b"] and ga.attempt == 1


def test_a_retry_does_not_wait_for_a_survivor_whose_record_is_past_the_round() -> None:
    """A survivor that committed (or gave the round up) publishes its record at a later round: a retry
    that expected it ends its gather at the next records read instead of at the long retry window."""
    spec = fast_spec(averaging={"group_size": 3, "join_timeout": 0.05, "allreduce_timeout": 20.0},
                     network={"poll_interval": 0.01})
    tt = RoundTimeouts.from_spec(spec)
    directory = _SharedDeclarations("b", spec, {}, ["b"])
    directory._recs.append(PeerRecord(peer_id="a", round=4, model_sha256="m2", outer_sha256="o",
                                      spec_hash=spec.spec_hash, client_mode=False, maddrs=[], state="training"))
    mm = Matchmaker(FakeNet("b", {}), directory, spec, tt, client_mode=False, maddrs=lambda: [],
                    stopping=threading.Event(), on_phase=lambda p, d: None, on_enter=lambda p, r, level: None)
    req = AverageRequest(round=3, delta=torch.zeros(4), weight=1.0, model_sha256="m", steps=1)
    assert tt.retry_window > 60  # waiting for "a" would time this out
    out = asyncio.run(asyncio.wait_for(mm.matchmake(req, 1, {"cheater"}, {"a"}), 5))
    assert out == NoGroup()


def test_a_peer_declared_on_another_base_is_not_waited_for() -> None:
    """A peer that rolled its last round back declares at the same round on its old base: it cannot be in
    our group this attempt, so the gather does not wait the whole window for it (the hostile-peer test
    spent 10 s of every other round so, 60 s of its 116)."""
    spec = fast_spec(averaging={"group_size": 3, "matchmaking_timeout": 60.0}, network={"poll_interval": 0.01})
    table: dict[tuple[int, int, bool, int], dict[str, Declaration]] = {
        (3, 0, False, 1): {"a": Declaration("a", "rolled-back-base", False, [])}}
    mm = Matchmaker(FakeNet("b", {}), _SharedDeclarations("b", spec, table, ["a", "b"]), spec,
                    RoundTimeouts.from_spec(spec), client_mode=False, maddrs=lambda: [], stopping=threading.Event(),
                    on_phase=lambda p, d: None, on_enter=lambda p, r, level: None)
    req = AverageRequest(round=3, delta=torch.zeros(4), weight=1.0, model_sha256="m", steps=1)
    out = asyncio.run(asyncio.wait_for(mm.matchmake(req, 0, set(), None), 5))  # "a" is expected: its record
    assert out == NoGroup()


def test_a_handler_cancelled_at_shutdown_ends_quietly() -> None:
    """asyncio's stream server (3.11) asks a finished handler task for its exception; a cancelled one
    raised CancelledError inside the loop's callback: an ERROR with a traceback per call in flight at
    shutdown (seen at the end of the flood test)."""
    from swarmfold.averaging.transport import _quiet_on_cancel

    async def forever(info: Any, reader: asyncio.StreamReader, writer: Any) -> None:
        await asyncio.Event().wait()

    async def go() -> None:
        writer = _Writer()
        task = asyncio.ensure_future(_quiet_on_cancel(forever)(_Info("x"), asyncio.StreamReader(), writer))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait([task])
        assert not task.cancelled() and task.exception() is None  # what the stream server's callback asks
        assert writer.closed
    asyncio.run(go())
