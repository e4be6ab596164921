"""One timeout budget: every bound of a round, derived in one place from the spec.

The spec's [averaging] section holds the four hashed settings that shape a round
(matchmaking_timeout, join_timeout, allreduce_timeout, commit_timeout: peers of one swarm
must agree on them). [network] holds the purely local ones (dht_timeout,
state_sync_timeout, poll_interval). Everything else below is derived, and each
multiplier says why it is what it is. docs/swarm.md sums them into how long each phase
can take at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmfold.spec import Spec

# a blocking call from another thread into the network loop waits this much longer than the
# bound of the coroutine it runs, so that the coroutine's own, named timeout fires first
HANDOFF_MARGIN = 5.0


@dataclass(frozen=True)
class RoundTimeouts:
    """Seconds. Built by `from_spec`; nothing else in the round holds a timeout of its own."""

    matchmaking: float  # attempt 0: how long a ready peer gathers declarations (averaging.matchmaking_timeout)
    join: float  # one propose / final / cancel / hello request and its answer (averaging.join_timeout)
    allreduce: float  # a reducer waits this long for every member's part (averaging.allreduce_timeout)
    commit: float  # a member waits this long for the others' digest votes (averaging.commit_timeout)
    dht: float  # one DHT store or get (network.dht_timeout)
    state_sync: float  # one download of θ_r and the outer state from one peer (network.state_sync_timeout)
    poll: float  # how often matchmaking re-reads the declarations (network.poll_interval)
    attempts: int = 3  # attempts of one level's round before it is rolled back (averaging.max_attempts)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def retry_window(self) -> float:
        """How long a retry gathers while a survivor of the failed attempt has not declared yet.

        The survivors are known by name, and the gather ends as soon as every one of them has
        declared (or its record is past the round), so this bound counts only when one never
        comes. It must cover a survivor that is still inside the failed attempt: a reducer
        replaying the members' rounds on a loaded machine, or a member waiting on a slow
        reducer, leaves the attempt within its safety net (attempt_budget), and then declares
        (one join's time to be seen). A shorter window made the fast survivor give up on a slow
        leader that was merely finishing the attempt, and the round was lost for both."""
        return self.attempt_budget + self.join

    @property
    def lone_retry_window(self) -> float:
        """A retry with no survivor to wait for (the others failed) gathers for 2 x join: a peer of
        this round that was not in the failed group may still be there to average with."""
        return 2 * self.join

    def gather_window(self, attempt: int, *, survivors: bool = True) -> float:
        """The gather's bound: attempt 0's window, or a retry's (long only while survivors are awaited)."""
        if attempt == 0:
            return self.matchmaking
        return self.retry_window if survivors else self.lone_retry_window

    @property
    def leader_grace(self) -> float:
        """How long past its own gathering deadline a member waits for its leader's proposal, and
        after accepting it, for the final list: the leader sends each of them after one join
        exchange with every member (run in parallel), hence 2 x join."""
        return 2 * self.join

    def declaration_ttl(self, attempt: int) -> float:
        """A matchmaking declaration lives for the gather window plus the leader's grace, so that
        it is visible for as long as anyone may still form a group from it."""
        return self.gather_window(attempt) + self.leader_grace

    @property
    def waiting_room_ttl(self) -> float:
        return self.matchmaking + self.leader_grace

    @property
    def reducer_ready(self) -> float:
        """A reducer that gets a part before it has learnt the group itself (the leader's final list
        reaches members in parallel) waits this long for it: the leader's grace."""
        return self.leader_grace

    @property
    def span_exchange(self) -> float:
        """A member's bound on one span exchange with a reducer (stream the part, receive the
        aggregate), and a reducer's bound on reading one member's chunks or streaming the result
        back: the reducer's own wait (allreduce) plus as long again to compute and stream the
        aggregate, which it starts only once every part is in or timed out."""
        return 2 * self.allreduce

    @property
    def attempt_budget(self) -> float:
        """A safety net around the all-reduce and commit of one attempt (each step inside is bounded
        on its own): a span exchange (2 x allreduce) plus a reducer's slowest wait (allreduce), two
        commits (our votes go out while others' come in), and the leader's grace for a late member."""
        return self.span_exchange + self.allreduce + 2 * self.commit + self.leader_grace

    @property
    def tree_level(self) -> float:
        """One level of the tree above a peer's group (N > G): every attempt's whole matchmaking
        (its window, the leader's two graces) and its all-reduce and commit (the safety net)."""
        windows = self.matchmaking + (self.attempts - 1) * self.retry_window
        return windows + self.attempts * (2 * self.leader_grace + self.attempt_budget)

    def tree_wait(self, levels: int) -> float:
        """How long a group's member waits for its delegate to bring the top level's aggregate down:
        `levels` levels, and the delegate's own commit, which may end a commit window after ours."""
        return levels * self.tree_level + self.commit + self.leader_grace

    @property
    def state_sync_total(self) -> float:
        """The whole catch-up: a failed source and a second one (network.state_sync_timeout each)."""
        return 2 * self.state_sync

    @property
    def swarm_view(self) -> float:
        """How long a peer that joins through others waits to see their records before its first
        catch-up: one DHT operation's bound (network.dht_timeout). The records are already in the
        DHT (each peer publishes its record before it trains); a DHT that cannot return them in one
        operation's time is not settling but unreachable, and the peer starts from its own state."""
        return self.dht

    @property
    def split_wait(self) -> float:
        """How long a peer that just finished a round alone waits for the peers split from it at that
        round (another base model) to publish their next one (daemon/runner.py `split_peers`): they
        are in the same round's matchmaking, which ends within its phase bound (the window and a
        follower's two graces), plus one DHT store of their record."""
        return self.matchmaking + 2 * self.leader_grace + self.dht

    @property
    def dht_call(self) -> float:
        """A blocking call from another thread that does one DHT operation on the network loop."""
        return self.dht + HANDOFF_MARGIN

    @property
    def local_call(self) -> float:
        """A blocking call that does only local work on the network loop (add a handler, close a
        stream): the loop may be busy with a round's traffic, never for this long."""
        return 2 * HANDOFF_MARGIN

    @classmethod
    def from_spec(cls, spec: Spec) -> RoundTimeouts:
        a, n = spec.averaging, spec.network
        return cls(matchmaking=a.matchmaking_timeout, join=a.join_timeout, allreduce=a.allreduce_timeout,
                   commit=a.commit_timeout, dht=n.dht_timeout, state_sync=n.state_sync_timeout,
                   poll=n.poll_interval, attempts=a.max_attempts)

    def phase_bounds(self) -> dict[str, float]:
        """The longest each phase of one attempt can take (what docs/swarm.md tabulates)."""
        return {
            # a follower: the window, its leader's grace for the proposal, the grace again for the final list
            "matchmaking (attempt 0)": self.matchmaking + 2 * self.leader_grace,
            "matchmaking (retry)": self.retry_window + 2 * self.leader_grace,
            "all-reduce": self.span_exchange,
            "commit": self.commit,
            "all-reduce + commit (safety net)": self.attempt_budget,
            "one tree level above the group (N > G)": self.tree_level,
            "state sync": self.state_sync_total,
        }
