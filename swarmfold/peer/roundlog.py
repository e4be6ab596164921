"""The round log: one JSON line per finished round in a peer's workdir (`rounds.jsonl`).

Each line says what round r was for this peer: its status, the group and the members that
were included, their weights and **the inner steps each declared** (in time mode each peer
trains as many as fit in `round.seconds`, so the count is part of what makes a round
reproducible), and the model hashes before and after. `swarmfold simulate --steps-from`
reads the logs of the peers of a swarm back to reproduce its rounds bit for bit.

Appending is one `write` of one whole line with O_APPEND, so a crash leaves at most a torn
last line, which the reader skips with a warning. A round done twice (a restart from an
older checkpoint redoes it) appears twice; the later line is the one that counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swarmfold.errors import UserError

logger = logging.getLogger(__name__)

ROUND_LOG = "rounds.jsonl"


class RoundLogError(UserError):
    """A round log that cannot give the steps asked of it (unreadable, inconsistent, incomplete)."""


def append_round(workdir: Path, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(Path(workdir) / ROUND_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_rounds(path: Path) -> dict[int, dict[str, Any]]:
    """Round -> its latest entry in one log (a torn or foreign line is skipped with a warning)."""
    path = Path(path)
    if path.is_dir():
        path = path / ROUND_LOG
    try:
        text = path.read_text()
    except OSError as e:
        raise RoundLogError(f"cannot read the round log {path}: {e.strerror or e}; pass a peer's workdir or "
                            f"its {ROUND_LOG}") from e
    out: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rnd = int(entry["round"])
            steps = {str(p): int(k) for p, k in dict(entry["steps"]).items()}
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s line %d is not a round entry (%s); skipped", path, n, e)
            continue
        out[rnd] = {**entry, "steps": steps}
    return out


def steps_from(paths: Iterable[Path]) -> dict[int, dict[str, int]]:
    """Round -> peer id -> the inner steps it declared, merged from the logs of several peers.

    Only rounds whose contributions entered a model count (committed, or alone); two logs
    that disagree about one peer's steps in one round are an error that names both."""
    merged: dict[int, dict[str, int]] = {}
    source: dict[tuple[int, str], Path] = {}
    for path in paths:
        for rnd, entry in read_rounds(path).items():
            if entry.get("status") not in ("committed", "alone"):
                continue
            for peer, k in entry["steps"].items():
                have = merged.setdefault(rnd, {}).get(peer)
                if have is not None and have != k:
                    raise RoundLogError(f"round {rnd}: {source[rnd, peer]} says peer {peer[-8:]} trained {have} "
                                        f"steps, {path} says {k}; these logs are not of one swarm")
                merged[rnd][peer] = k
                source.setdefault((rnd, peer), Path(path))
    return merged
