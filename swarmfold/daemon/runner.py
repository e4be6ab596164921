"""The round loop of a running peer: join the swarm, catch up, train, average, checkpoint, publish.

`run_peer` is what `swarmfold run` runs in the foreground and what the background daemon
runs in its main thread. It owns one LocalPeer (peer/) and one Swarm (averaging/), and
reports to a PeerStatus while obeying Controls (stop, pause) from signals and the API.

Exit codes: 0 done or stopped cleanly; 1 a runtime failure; 2 bad input (spec, data,
checkpoint, a swarm running another spec).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from swarmfold.averaging.datashare import DataServer
from swarmfold.averaging.identity import load_or_create_identity
from swarmfold.averaging.protocol import SpecMismatch, StateSyncError
from swarmfold.averaging.records import PeerRecord
from swarmfold.averaging.swarm import JoinError, Swarm
from swarmfold.averaging.transport import DHT_ERRORS
from swarmfold.daemon.options import PeerOptions
from swarmfold.daemon.publicdata import fetch_public_shard, serve_shard
from swarmfold.daemon.replay import make_swarm_verifier
from swarmfold.daemon.state import Controls, PeerStatus, RoundRecord
from swarmfold.errors import ExitCode
from swarmfold.fsutil import write_json_atomic
from swarmfold.peer.data import DataError
from swarmfold.peer.device import describe, resolve_device
from swarmfold.peer.local import LocalPeer, RoundReport, TrainingInterrupted
from swarmfold.peer.trainer import set_threads
from swarmfold.progress import Progress
from swarmfold.spec import Spec, load_spec

logger = logging.getLogger(__name__)



@dataclass
class SyncTarget:
    round: int
    model_sha256: str
    sources: list[PeerRecord]


def choose_sync_target(records: dict[str, PeerRecord], *, me: str, my_round: int, my_hash: str,
                       my_provenance: str = "group") -> SyncTarget | None:
    """The state this peer should adopt before training, or None to keep its own.

    Candidates are the states that came out of a group commit (or a sync to one); a peer
    that trained alone or rolled back publishes its round with a local model, which is
    never copied while group states exist. The swarm's state is the (round, model hash)
    held by the most peers (ties: the later round, then the smaller hash). A peer behind it
    downloads it. Never back a round, and never jump to a later round that holds our own model:
    a peer that gave a round up (rolled back: θ_r kept) counts its rounds on with the same model,
    so such a record is no progress, only a round number (a rejected attacker's, for one); if the
    swarm really is there, matchmaking's moved-on rule takes us there. At the same round:

    - a peer whose own state is a group's (`my_provenance` "group") keeps it unless a strictly
      larger group holds another: a rolled-back peer's stale model never replaces a commit;
    - a peer whose own state is local (it trained alone or rolled back) adopts a group's
      state, or a local one held by more peers, or, one against one, the one whose hash
      sorts first. Without that tie-break, two peers left at one round with models of their
      own (a restart, a late sync) would never average again: matchmaking groups only equal
      base models, and each would wait for the other to move.
    """
    groups: dict[tuple[int, str, str], list[PeerRecord]] = {}
    for rec in records.values():
        if rec.peer_id == me or rec.state in ("syncing", "starting"):
            continue
        if rec.round > my_round and rec.model_sha256 == my_hash:
            continue
        groups.setdefault((rec.round, rec.model_sha256, rec.outer_sha256), []).append(rec)
    shared = {k: v for k, v in groups.items() if any(r.metrics.get("provenance", "group") == "group" for r in v)}
    groups = shared or groups
    if not groups:
        return None
    (rnd, model, _), sources = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0][0], _neg(kv[0][1])))
    if rnd < my_round or (rnd == my_round and model == my_hash):
        return None
    if rnd == my_round:
        mine = 1 + sum(len(v) for k, v in groups.items() if k[0] == my_round and k[1] == my_hash)
        if my_provenance == "group":
            if len(sources) <= mine:
                return None
        else:
            theirs_shared = any(r.metrics.get("provenance", "group") == "group" for r in sources)
            if not (len(sources) > mine or (len(sources) == mine and (theirs_shared or model < my_hash))):
                return None
    return SyncTarget(round=rnd, model_sha256=model, sources=sorted(sources, key=lambda r: r.peer_id))


def split_peers(records: dict[str, PeerRecord], *, me: str, my_round: int, my_base: str | None) -> set[str]:
    """The peers that were at our last round with another base model and have not published the
    next one yet: peers split from us, still finishing that round (almost always alone, as we did).

    `choose_sync_target` settles a split between two peers at one round only if the peer that must
    adopt reads the records after the other one published. Two split peers end their rounds
    alone at the same gathering deadline, so without waiting that order is a coin toss each round
    (test_rejoin.py failed four rounds running in CI). A peer that has just finished a round alone
    waits for these peers' next records first, bounded by `RoundTimeouts.split_wait`.
    """
    if my_base is None or my_round < 1:
        return set()
    return {r.peer_id for r in records.values()
            if r.peer_id != me and r.round == my_round - 1 and r.state == "training" and r.model_sha256 != my_base}


def _neg(h: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in h)


class PeerRunner:
    """One peer's life in the swarm. Construct, then `run()`; `swarm_cls` lets tests inject faults."""

    def __init__(self, options: PeerOptions, *, status: PeerStatus | None = None, controls: Controls | None = None,
                 settings: Any = None, swarm_cls: type[Swarm] = Swarm,
                 on_ready: Callable[[list[str]], None] | None = None,
                 on_round: Callable[[RoundReport], None] | None = None,
                 step_hook: Callable[[int], None] | None = None):
        self.options = options
        self.status = status or PeerStatus()
        self.controls = controls or Controls()
        self.settings = settings
        self.swarm_cls = swarm_cls
        self.on_ready = on_ready
        self.on_round = on_round
        self.step_hook = step_hook
        self.spec: Spec | None = None
        self.peer: LocalPeer | None = None
        self.swarm: Swarm | None = None
        self.rounds_done = 0
        self._synced_at = -1  # the round whose state we last downloaded
        self._base_sha256: str | None = None  # θ_r's hash when this peer last started training (round r)
        self._data_server: DataServer | None = None  # serves the public data in a verifying swarm

    # ---- setup ---------------------------------------------------------------------------
    def _setup(self) -> None:
        o = self.options
        self.spec = spec = load_spec(o.spec)
        if o.data_port is not None:  # a local setting ([network], outside the swarm id): no fork
            self.spec = spec = spec.replace(network={"data_port": o.data_port})
        set_threads(o.threads)
        resolve_device(o.device)  # a missing device fails before we join the swarm
        o.workdir.mkdir(parents=True, exist_ok=True)
        identity = load_or_create_identity(Path(o.workdir) / "identity.key")
        self.status.update(peer_id=identity.peer_id, swarm_id=spec.swarm_id, spec_hash=spec.spec_hash)
        verifying = spec.verify.fraction > 0
        if not o.data and not verifying:
            raise DataError("--data is required: this swarm does not verify by replay (verify.fraction = 0), so "
                            "every peer trains on its own shard; pass its files, folders or globs with --data")
        # bad data, or data other than a verifying swarm's public shard, fails before we join
        peer = self._make_peer(spec, o.data, identity.peer_id) if o.data else None
        self.swarm = self.swarm_cls(
            spec, identity, initial_peers=list(o.initial_peers) + list(spec.network.bootstrap_peers),
            host_maddrs=o.host_maddrs, announce_maddrs=o.announce_maddrs, announce_data=o.announce_data,
            client_mode=o.client_mode,
            use_relay=o.use_relay, use_auto_relay=o.use_auto_relay, on_phase=self._on_phase,
            stop_event=self.controls.stop,
            verifier=make_swarm_verifier(peer) if verifying and peer is not None else None)
        self.swarm.start()
        self.status.update(visible_maddrs=list(self.swarm.maddrs))
        self.swarm.check_spec(list(o.initial_peers) + list(spec.network.bootstrap_peers))
        if peer is None:  # a verifying swarm's peer without --data: fetch the public shard from peers
            self.status.set_state("syncing", "fetching the public data from peers")
            public_dir, text_field = fetch_public_shard(self.swarm, spec, o.workdir)
            if text_field != o.text_field:  # the public data names its text field; a --text-field cannot change it
                logger.info("reading the public data's %r field (its manifest's), not --text-field %r",
                            text_field, o.text_field)
            peer = self._make_peer(spec, [str(public_dir)], identity.peer_id, text_field=text_field)
            self.swarm.verifier = make_swarm_verifier(peer)
        if verifying and not o.client_mode:  # every peer of a verifying swarm holds the public shard: serve it
            self._data_server = serve_shard(self.swarm, peer.shard)
        self._await_swarm_view(bool(o.initial_peers or spec.network.bootstrap_peers))
        self._share_state("starting")
        write_json_atomic(Path(o.workdir) / "peer.json", {
            "peer_id": identity.peer_id, "swarm_id": spec.swarm_id, "spec_hash": spec.spec_hash,
            "maddrs": list(self.swarm.maddrs), "client_mode": o.client_mode})
        if self.on_ready:
            self.on_ready(list(self.swarm.maddrs))

    def _make_peer(self, spec: Spec, data: list[str], peer_id: str, *, text_field: str | None = None) -> LocalPeer:
        o = self.options
        data_options = o.data_options()
        if text_field is not None:
            data_options = replace(data_options, text_field=text_field)
        self.peer = peer = LocalPeer(spec, data, peer_id=peer_id, threads=o.threads, workdir=o.workdir,
                                     keep_checkpoints=o.keep_checkpoints, device=o.device,
                                     activation_checkpointing=o.activation_checkpointing,
                                     data_options=data_options)
        self.status.update(device=describe(peer.device), precision=spec.inner.precision)
        logger.info("%s", peer.shard.summary())
        self.status.update(data=peer.shard.summary())
        write_json_atomic(Path(o.workdir) / "manifest.json", peer.shard.manifest_document())  # files used and skipped
        if not peer.resume():
            self._checkpoint()  # round 0: a stop before the first round still leaves a checkpoint
        self.status.update(round=peer.round, model_sha256=peer.theta_sha256, **peer.credit.view())
        return peer

    def _await_swarm_view(self, joining: bool) -> None:
        """A peer that joins through others waits until it sees their records (RoundTimeouts.swarm_view
        at most), so that its first catch-up knows where the swarm is instead of training a stale round."""
        assert self.swarm is not None and self.peer is not None
        if not joining:
            return
        timeout = self.swarm.timeouts.swarm_view
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.controls.stop.is_set():
            try:
                if any(pid != self.peer.peer_id for pid in self.swarm.records()):
                    return
            except DHT_ERRORS as e:  # the DHT is still settling; try again shortly
                logger.debug("records not readable yet: %s", e)
            except Exception:  # not a DHT hiccup: a bug worth seeing
                logger.warning("reading the swarm's records failed unexpectedly", exc_info=True)
            self.controls.stop.wait(self.swarm.timeouts.poll)
        logger.info("[%s] no other peer's record visible after %.0fs; starting from our own state",
                    self.peer.peer_id[-8:], timeout)

    def _await_launch(self) -> None:
        """--wait-for-peers N: a fresh peer (round 0) starts training only once it sees N peers' records,
        itself included, so that a coordinated launch meets in round 0's averaging instead of splitting
        into whoever started first and latecomers who then catch up (their first round lost). Waits
        until stopped; says every few seconds how many it sees."""
        assert self.swarm is not None and self.peer is not None
        want = self.options.wait_for_peers
        if want <= 1 or self.peer.round != 0:
            return
        me, last_said, seen = self.peer.peer_id, 0.0, 1
        while not self.controls.stop.is_set():
            try:
                seen = len(set(self.swarm.records()) | {me})
            except DHT_ERRORS as e:  # the DHT is still settling; look again shortly
                logger.debug("records not readable yet: %s", e)
            if seen >= want:
                logger.info("[%s] %d of %d peers are here; starting round 0", me[-8:], seen, want)
                return
            self.status.set_state("waiting", f"launch: {seen} of {want} peers are here (--wait-for-peers)")
            if time.monotonic() - last_said > 10.0:
                last_said = time.monotonic()
                logger.info("[%s] waiting for the launch: %d of %d peers are here", me[-8:], seen, want)
            self.controls.stop.wait(self.swarm.timeouts.poll)

    def _on_phase(self, phase: str, detail: str) -> None:
        self.status.set_state("averaging" if phase != "matchmaking" else "waiting", f"{phase}: {detail}")

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self._setup()
            return self._loop()
        except SpecMismatch as e:
            logger.error("%s", e)
            return ExitCode.BAD_INPUT
        except JoinError as e:
            logger.error("%s", e)
            return ExitCode.FAILURE
        except TrainingInterrupted:
            logger.info("stopped during training; the last checkpoint (round %s) is the state",
                        self.peer.round if self.peer else "?")
            return ExitCode.OK
        finally:
            self.status.set_state("stopping", "shutting down")
            if self.swarm is not None:
                self.swarm.shutdown()
            self.status.set_state("stopped", "")

    def _loop(self) -> int:
        assert self.peer is not None and self.swarm is not None
        limit = self.options.rounds
        self._await_launch()
        while not self.controls.stop.is_set():
            if limit is not None and self.peer.round >= limit:
                logger.info("[%s] reached round %d; stopping", self.peer.peer_id[-8:], self.peer.round)
                break
            if self.controls.paused:
                self._pause()
                continue
            self._catch_up()
            self.status.set_state("training", self._training_detail())
            self._base_sha256 = self.peer.theta_sha256
            phase = self.peer.train_phase(step_hook=self._step_hook)
            self.status.update(**self.peer.credit.view())  # the phase confirmed our last commit, or not
            result = self.swarm.average(self.peer.request(phase))
            report = self.peer.finish_round(phase, result)
            self._after_round(report)
        return ExitCode.OK

    def _training_detail(self) -> str:
        assert self.peer is not None
        r = self.peer.spec.round
        if r.mode == "time":
            return (f"round {self.peer.round}: inner steps for {r.seconds:g} s ({r.min_steps} to {r.inner_steps})")
        return f"round {self.peer.round}: {r.inner_steps} inner steps"

    def _step_hook(self, step: int) -> None:
        if self.controls.stop.is_set():
            raise TrainingInterrupted(f"stop requested at inner step {step}")
        if self.step_hook is not None:
            self.step_hook(step)

    def _pause(self) -> None:
        assert self.peer is not None
        self.status.set_state("paused", "paused by the user or the resource policy")
        self.status.update(paused=True)
        self._share_state("paused")
        last_look = 0.0
        while self.controls.paused and not self.controls.stop.is_set():
            if time.monotonic() - last_look > 5.0:  # keep the swarm view fresh while paused
                last_look = time.monotonic()
                try:
                    records = self.swarm.records() if self.swarm is not None else {}
                    self.status.set_swarm({pid: _record_view(r) for pid, r in records.items()})
                except DHT_ERRORS as e:  # a DHT hiccup only delays the view
                    logger.info("could not read the swarm's records while paused: %s", e)
                except Exception:  # not a DHT hiccup: a bug worth seeing
                    logger.warning("reading the swarm's records failed unexpectedly", exc_info=True)
            self.controls.resume_event.wait(timeout=1.0)
        self.status.update(paused=False)
        logger.info("[%s] resumed", self.peer.peer_id[-8:])

    def _catch_up(self) -> None:
        """Adopt the swarm's state if this peer is behind it (late join, restart, a round alone)."""
        assert self.peer is not None and self.swarm is not None
        try:
            records = self._read_records()
        except DHT_ERRORS as e:  # a DHT hiccup must not kill the peer; try again next round
            logger.warning("could not read the swarm's records: %s", e)
            return
        except Exception:  # not a DHT hiccup: a bug worth seeing; the peer trains on and tries next round
            logger.warning("reading the swarm's records failed unexpectedly", exc_info=True)
            return
        if self._provenance() == "local":
            records = self._await_split_peers(records)
        self.status.set_swarm({pid: _record_view(r) for pid, r in records.items()})
        target = choose_sync_target(records, me=self.peer.peer_id, my_round=self.peer.round,
                                    my_hash=self.peer.theta_sha256, my_provenance=self._provenance())
        if target is None:
            return
        self.status.set_state("syncing", f"downloading round {target.round} from the swarm")
        try:
            with Progress(f"downloading the state of round {target.round}", unit="B", log=logger) as bar:
                rnd, theta, outer, source = self.swarm.download_state(target.sources, numel=self.peer.theta.numel(),
                                                                      on_progress=bar.callback())
        except StateSyncError as e:
            logger.warning("[%s] state sync failed: %s; training from our own state", self.peer.peer_id[-8:], e)
            return
        self.peer.load_shared_state(rnd, theta, outer, source=source)
        self._synced_at = rnd
        self.status.update(round=self.peer.round, model_sha256=self.peer.theta_sha256,
                           **self.peer.credit.view())
        logger.info("[%s] synced to round %d (model %s) from %s", self.peer.peer_id[-8:], rnd,
                    self.peer.theta_sha256[:12], source[-8:])
        self._checkpoint()
        self._share_state("training")

    def _read_records(self) -> dict[str, PeerRecord]:
        """The swarm's peer records, as the catch-up reads them (tests order peers around this read)."""
        assert self.swarm is not None
        return self.swarm.records()

    def _await_split_peers(self, records: dict[str, PeerRecord]) -> dict[str, PeerRecord]:
        """After a round alone: wait (polling the records, bounded) until the peers split from us at
        that round have published their next round, so that both sides of the split decide on the
        same records (see `split_peers`). Returns the latest records read."""
        assert self.peer is not None and self.swarm is not None
        waiting = split_peers(records, me=self.peer.peer_id, my_round=self.peer.round, my_base=self._base_sha256)
        if not waiting:
            return records
        timeouts = self.swarm.timeouts
        logger.info("[%s] waiting up to %.0f s for %d peer(s) split from us at round %d to finish it: %s",
                    self.peer.peer_id[-8:], timeouts.split_wait, len(waiting), self.peer.round - 1,
                    ", ".join(sorted(p[-8:] for p in waiting)))
        deadline = time.monotonic() + timeouts.split_wait
        while waiting and time.monotonic() < deadline and not self.controls.stop.is_set():
            self.controls.stop.wait(timeout=timeouts.poll)
            try:
                records = self._read_records()
            except DHT_ERRORS as e:  # a DHT hiccup: read again at the next poll
                logger.info("could not read the swarm's records: %s", e)
                continue
            waiting &= split_peers(records, me=self.peer.peer_id, my_round=self.peer.round,
                                   my_base=self._base_sha256)
        if waiting:
            logger.info("[%s] %d split peer(s) did not finish round %d in %.0f s; deciding without them",
                        self.peer.peer_id[-8:], len(waiting), self.peer.round - 1, timeouts.split_wait)
        return records

    def _after_round(self, report: RoundReport) -> None:
        assert self.peer is not None
        self._checkpoint()
        self.rounds_done += 1
        res = report.result
        record = RoundRecord(round=report.round, status=report.status, train_loss=report.train_loss,
                             tokens=report.tokens, tokens_per_second=report.tokens_per_second,
                             group_size=len(res.included) if res.included else 1, model_sha256=report.model_sha256,
                             timings=report.timings, finished_at=time.time(), steps=report.steps)
        self.status.on_round(record, bytes_sent=res.bytes_sent, bytes_received=res.bytes_received,
                             rejected=res.rejected,
                             allreduce_seconds=res.timings.get("allreduce") if res.status == "committed" else None)
        self.status.update(tokens_total=self.peer.tokens_total, **self.peer.credit.view())
        self._share_state("training")
        logger.info("[%s] round %d %s (%s): loss %.4f, %.0f tokens/s, model %s", self.peer.peer_id[-8:], report.round,
                    report.status, res.reason or f"group of {len(res.included)}", report.train_loss,
                    report.tokens_per_second, report.model_sha256[:12])
        if self.on_round:
            self.on_round(report)

    def _provenance(self) -> str:
        """'group' when θ_r came out of a group commit (or genesis, or a sync to such a state);
        'local' after a round alone or rolled back, when θ_r is this peer's own."""
        assert self.peer is not None
        if self._synced_at == self.peer.round:
            return "group"
        return "local" if self.peer.last_round.get("status") in ("alone", "rolled_back") else "group"

    def _checkpoint(self) -> None:
        assert self.peer is not None
        path = self.peer.save()
        self.status.on_checkpoint(str(path), time.time())

    def _share_state(self, state: str) -> None:
        """Serve θ_r to joiners and publish (round, hashes, metrics) to the DHT."""
        assert self.peer is not None and self.swarm is not None
        model_sha, outer_sha = self.swarm.serve_state(self.peer.round, self.peer.theta, self.peer.outer.state_dict())
        snap = self.status.snapshot()
        last = snap["history"][-1] if snap["history"] else {}
        record = PeerRecord(
            peer_id=self.peer.peer_id, round=self.peer.round, model_sha256=model_sha, outer_sha256=outer_sha,
            spec_hash=self.peer.spec.spec_hash, client_mode=self.options.client_mode, maddrs=list(self.swarm.maddrs),
            state=state, metrics={"provenance": self._provenance(),
                                  "loss": snap["loss"], "tokens_total": snap["tokens_total"],
                                  "tokens_counted": snap["tokens_counted"], "tokens_wasted": snap["tokens_wasted"],
                                  "tokens_per_second": snap["tokens_per_second"],
                                  "rounds_committed": snap["rounds"].get("committed", 0),
                                  # the inner steps this peer declared for its last round (time mode: what fit)
                                  "steps": self.peer.last_round.get("steps", {}).get(self.peer.peer_id),
                                  "timings": last.get("timings", {}),
                                  "group": _group_view(self.peer.last_round)})
        try:
            self.swarm.publish(record)
        except DHT_ERRORS as e:  # publishing is best effort; the heartbeat retries
            logger.warning("could not publish our record: %s", e)
        except Exception:  # not a DHT hiccup: a bug worth seeing; the heartbeat still retries
            logger.warning("publishing our record failed unexpectedly", exc_info=True)


def _group_view(last: dict[str, Any]) -> dict[str, Any]:
    """Which group and members made up this peer's last round, with their weights and the commit digest,
    and for a tree (N > G) each level above the group: what the DHT record shows of a round."""
    if last.get("status") != "committed":
        return {}
    return {"id": last.get("group_id", ""), "digest": last.get("digest", ""),
            "included": list(last.get("included", [])), "weights": dict(last.get("weights", {})),
            "tree": [{k: lv[k] for k in ("level", "group_id", "included", "weights", "digest")}
                     for lv in last.get("tree", [])]}


def _record_view(r: PeerRecord) -> dict[str, Any]:
    return {"round": r.round, "model_sha256": r.model_sha256, "state": r.state, "time": r.time,
            "client_mode": r.client_mode, **{k: v for k, v in r.metrics.items()}}


def run_peer(options: PeerOptions, *, status: PeerStatus | None = None, controls: Controls | None = None,
             settings: Any = None, **kwargs: Any) -> int:
    """Run one peer until `options.rounds` are done or a stop is requested; returns an exit code."""
    return PeerRunner(options, status=status, controls=controls, settings=settings, **kwargs).run()


def hash_agreement(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many peers hold each (round, model hash): the dashboard's agreement view."""
    return dict(Counter(f"{r.get('round')}:{str(r.get('model_sha256'))[:12]}" for r in records.values()))
