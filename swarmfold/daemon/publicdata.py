"""A verifying swarm's public data in a running peer: fetched from peers without --data, served when held.

A peer of a verifying swarm started without `--data` fetches the public shard (the spec's
`verify.public_data`) into `W/public/<manifest hash>/` and trains on that folder; a
restart finds it complete there and asks no one. Every peer of a verifying swarm trains on
the public shard, so every peer serves it, except in client mode (no one can connect to
it). See averaging/datashare.py for the checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from swarmfold.averaging.datashare import (
    DataServer,
    Manifest,
    ManifestFile,
    fetch_public_data,
    serve_public_data,
)
from swarmfold.averaging.swarm import Swarm
from swarmfold.peer.data import Shard
from swarmfold.peer.tokenizer import load_tokenizer
from swarmfold.progress import Progress
from swarmfold.spec import Spec

logger = logging.getLogger(__name__)



def public_data_dir(workdir: Path, manifest_hash: str) -> Path:
    return Path(workdir) / "public" / manifest_hash


def fetch_public_shard(swarm: Swarm, spec: Spec, workdir: Path) -> tuple[Path, str]:
    """The folder holding the spec's public data, fetched from the swarm's peers unless already complete,
    and the text field its manifest names (read the files with it to get the public manifest hash)."""
    dest = public_data_dir(workdir, spec.verify.public_data)
    logger.info("no --data: this swarm trains on its public data %s…; getting it from peers into %s",
                spec.verify.public_data[:12], dest)
    with Progress(f"fetching the public data {spec.verify.public_data[:12]}…", unit="B", log=logger) as bar:
        report = fetch_public_data(swarm, spec.verify.public_data, dest,
                                   tokenizer_ident=load_tokenizer(spec.tokenizer).ident,
                                   timeout=spec.network.fetch_timeout, wait=spec.network.fetch_wait,
                                   on_progress=bar.callback())
    return dest, report.text_field


def shard_manifest(shard: Shard) -> Manifest:
    """The manifest that peers fetch `shard` by: it hashes to `shard.manifest_hash`."""
    return Manifest(tuple(ManifestFile(e.name, e.sha256, e.size) for e in shard.manifest), shard.tokenizer.ident,
                    shard.options.text_field)


def serve_shard(swarm: Swarm, shard: Shard) -> DataServer:
    """Serve `shard` (a started swarm's peer's data) to peers that fetch it by its manifest hash."""
    manifest = shard_manifest(shard)
    return serve_public_data(swarm, manifest, {e.sha256: e.path for e in shard.manifest})
