"""Credit that tells the truth: which of a peer's trained tokens reached a committed swarm model.

Every token a peer trains is in exactly one of three states (docs/daemon.md, "Credit"):

- *pending*: only in this peer's own weights. A rolled-back round's tokens (its Δ carries,
  `carried`), an `alone` round's tokens (applied to θ_r, this peer's own model, `local`), and
  a group commit's tokens that are in the group's model but not yet confirmed (`committed`).
- *counted*: the committed model that holds them is confirmed: at the start of this peer's
  next train phase θ_r is still the model its last group commit produced.
- *wasted*: dropped. A state sync (the swarm moved to another model), a commit that did not
  include this peer's contribution, or a replayable round that drops the carried Δ.

trained == counted + pending + wasted, always (`Credit.trained`). The state is kept in
meta.json (`to_meta` / `from_meta`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Credit:
    counted: int = 0
    wasted: int = 0
    carried: int = 0  # pending: rolled-back rounds' tokens, in the local weights (the carried Δ)
    local: int = 0  # pending: alone rounds' tokens, in θ_r (this peer's own model)
    committed: int = 0  # pending: in the last group commit's model, awaiting confirmation
    commit_sha256: str = ""  # θ that commit produced
    assumed: int = 0  # of `counted`: tokens of a checkpoint written before credit was kept (see from_meta)

    @property
    def pending(self) -> int:
        return self.carried + self.local + self.committed

    @property
    def trained(self) -> int:
        return self.counted + self.pending + self.wasted

    def confirm(self, theta_sha256: str) -> None:
        """A train phase starts from θ_r: if it is still the model our last group commit produced,
        that commit's tokens reached the swarm's model."""
        if self.committed and theta_sha256 == self.commit_sha256:
            self.counted += self.committed
            self.committed = 0

    def on_round(self, status: str, tokens: int, *, included: bool, theta_sha256: str) -> None:
        """Round outcome `status` for a round that trained `tokens`; `theta_sha256` is θ_{r+1}."""
        if status == "rolled_back":
            self.carried += tokens
        elif status == "alone":  # the carried Δ went into this round's Δ, applied to our own θ
            self.local += self.carried + tokens
            self.carried = 0
        elif status == "committed":
            if included:
                self.committed += self.local + self.carried + tokens
            else:  # our Δ (and the carried one in it) is not in the aggregate; θ_r, the group's base, is
                self.wasted += self.carried + tokens
                self.committed += self.local
            self.local = self.carried = 0
            self.commit_sha256 = theta_sha256
        else:
            raise ValueError(f"unknown round status {status!r}")

    def on_sync(self) -> None:
        """θ_r and the local weights were replaced by a downloaded state: all pending work is lost."""
        self.wasted += self.pending
        self.carried = self.local = self.committed = 0
        self.commit_sha256 = ""

    def drop_carried(self) -> None:
        """A replayable round starts from θ_r: the carried Δ is dropped."""
        self.wasted += self.carried
        self.carried = 0

    def wasted_fraction(self) -> float:
        trained = self.trained
        return self.wasted / trained if trained else 0.0

    def view(self) -> dict[str, int]:
        """What status, records and /metrics show."""
        return {"tokens_counted": self.counted, "tokens_wasted": self.wasted, "tokens_pending": self.pending}

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Credit:
        """The credit a checkpoint's meta.json recorded. A checkpoint written before credit was kept
        has only `tokens_total` and `carried_tokens`: its carried tokens stay pending, and the rest,
        whose history is unknown, is assumed counted (and recorded as `assumed`, so it can be told
        apart): the leaderboard does not demote a peer that upgraded."""
        raw = meta.get("credit")
        if isinstance(raw, dict):
            fields = {k: raw[k] for k in ("counted", "wasted", "carried", "local", "committed", "assumed")
                      if isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool)}
            return cls(**fields, commit_sha256=str(raw.get("commit_sha256") or ""))
        total, carried = int(meta.get("tokens_total", 0)), int(meta.get("carried_tokens", 0))
        carried = min(max(carried, 0), total)
        return cls(counted=total - carried, carried=carried, assumed=total - carried)
