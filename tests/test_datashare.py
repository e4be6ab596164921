"""The public data as a content-addressed manifest that peers fetch from peers (issue 6, item 4).

Real hivemind DHTs on 127.0.0.1: three in-process Swarms (an honest provider, a
misbehaving one, a fetcher) for the fetch checks, and two `swarmfold run` processes for
the end-to-end check (marked slow).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fast_spec, write_spec
from swarm_helpers import (
    connected_swarms,
    log_tail,
    model_hashes,
    start_peer,
    wait_exit,
    wait_ready,
)

from swarmfold.averaging import wire
from swarmfold.averaging.datashare import (
    MANIFEST_FILE,
    DataServer,
    Manifest,
    ManifestFile,
    PublicDataFetchError,
    fetch_public_data,
    layout_problem,
    name_problem,
    size_problem,
)
from swarmfold.averaging.swarm import Swarm
from swarmfold.daemon.options import (
    PeerOptions,
    add_peer_arguments,
    options_from_args,
    options_to_argv,
)
from swarmfold.daemon.publicdata import shard_manifest
from swarmfold.manifest import manifest_hash
from swarmfold.peer.data import DataOptions, Shard
from swarmfold.peer.tokenizer import ByteTokenizer
from swarmfold.spec import Spec

TOK = ByteTokenizer()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard(path: Path, spec: Spec) -> Shard:
    return Shard([path], TOK, seq_len=spec.data.seq_len, val_fraction=spec.data.val_fraction)


def _manifest(shard: Shard) -> tuple[Manifest, dict[str, Path]]:
    m = Manifest(tuple(ManifestFile(e.name, e.sha256, e.size) for e in shard.manifest), shard.tokenizer.ident)
    return m, {e.sha256: e.path for e in shard.manifest}


def _make_data(root: Path, seed: int) -> Path:
    """A public shard as a folder: nested files, one larger than a wire chunk (1 MiB), distinct per seed."""
    rng = random.Random(seed)
    words = ["def", "return", "import", "class", "self", "value", "public", "data", "peer", "round"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n // 6)) + "\n"

    for name, n in (("a.txt", 20_000), ("pkg/mod.py", 30_000), ("pkg/sub/deep.txt", 5_000),
                    ("pkg.txt", 7_000), ("z-large.txt", 2_600_000)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# data set {seed}: {name}\n" + text(n), encoding="utf-8")
    (root / ".hidden").write_text("not part of the shard")
    return root


class MisbehavingServer(DataServer):
    """A provider that lies in one of several ways, chosen per manifest hash."""

    def __init__(self, swarm: Swarm):
        super().__init__(swarm)
        self.manifest_lies: dict[str, Manifest] = {}
        self.modes: dict[str, str] = {}  # manifest hash -> "stall" (after one chunk) or "oversize"

    def manifest_for(self, h: str) -> Manifest | None:
        return self.manifest_lies.get(h) or super().manifest_for(h)

    async def _send_file(self, served: Any, sha: str, offset: int, writer: asyncio.StreamWriter) -> None:
        mode = next((mode for h, mode in self.modes.items() if self._served.get(h) is served), None)
        if mode is None:
            await super()._send_file(served, sha, offset, writer)
            return
        size = served.sizes[sha]
        await wire.send(writer, {"ok": True, "size": size})
        if mode == "oversize":
            await wire.send(writer, {"data": b"x" * (size + 10)})
        else:  # one honest chunk, then nothing
            with open(served.paths[sha], "rb") as f:
                f.seek(offset)
                await wire.send(writer, {"data": f.read(1 << 20)})
            await asyncio.sleep(30)


@dataclass
class Net:
    spec: Spec
    honest: Swarm
    bad: Swarm
    client: Swarm
    honest_server: DataServer
    bad_server: MisbehavingServer


# the tests here share a module- or session-scoped fixture: one xdist worker runs them all (built once)
pytestmark = pytest.mark.xdist_group("test_datashare")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    spec = fast_spec()
    with connected_swarms(spec, tmp_path_factory.mktemp("keys"), ["honest", "bad", "client"]) as swarms:
        honest, bad, client = swarms
        yield Net(spec, honest, bad, client, DataServer(honest), MisbehavingServer(bad))


def _seed_trying_first(first: str, other: str) -> random.Random:
    """An rng whose shuffle of the two providers (sorted by peer id, as found) puts `first` first."""
    for seed in range(100):
        order = sorted([first, other])
        random.Random(seed).shuffle(order)
        if order[0] == first:
            return random.Random(seed)
    raise AssertionError("no seed found")


def _leftovers(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []


# ---- pure checks ---------------------------------------------------------------------------------

def test_hostile_names_and_sizes_are_refused() -> None:
    for bad in ("/etc/passwd", "../up.txt", "a/../../b", "a//b", "a/./b", "", "a\\b", "a\x00b", "a\nb",
                ".hidden", "d/.git/x", "__pycache__/m.pyc", "x" * 600, "d/" + "y" * 300):
        assert name_problem(bad) is not None, bad
    for good in ("a.txt", "pkg/sub/mod.py", "é/ü.txt", "a b/c-d_e.jsonl"):
        assert name_problem(good) is None, good
    sha = "0" * 64

    def m(*names: str) -> Manifest:
        return Manifest(tuple(ManifestFile(n, sha, 1) for n in names), "bytes-v1")

    assert layout_problem(m("a.txt", "b/c.txt", "b.txt")) is None  # a folder's order: parts, so b/ before b.txt
    assert "comes after" in str(layout_problem(m("b.txt", "a.txt")))
    assert "listed twice" in str(layout_problem(m("a", "a")))
    assert "file and a folder" in str(layout_problem(m("a", "a/b")))
    assert "'..'" in str(layout_problem(m("../x")))
    assert size_problem(m("a"), 10) is None
    assert "above the limit" in str(size_problem(Manifest((ManifestFile("a", sha, 6), ManifestFile("b", sha, 6)),
                                                          "bytes-v1"), 10))
    assert "hex" in str(size_problem(Manifest((ManifestFile("a", "G" * 64, 1),), "t"), 10))
    assert "size -1" in str(size_problem(Manifest((ManifestFile("a", sha, -1),), "t"), 10))
    with pytest.raises(ValueError, match="expected"):
        Manifest.from_dict({"files": [["a", sha, "1"]], "tokenizer": "t"})
    with pytest.raises(ValueError, match="between 1 and"):
        Manifest.from_dict({"files": [], "tokenizer": "t"})


# ---- real DHTs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_fetched_copy_has_the_same_manifest_hash_and_bytes(net: Net, tmp_path: Path) -> None:
    data = _make_data(tmp_path / "public", seed=1)
    shard = _shard(data, net.spec)
    m, paths = _manifest(shard)
    h = net.honest_server.serve(m, paths)
    assert h == shard.manifest_hash == manifest_hash([(e.name, e.sha256) for e in shard.manifest], TOK.ident)

    dest = tmp_path / "fetched"
    report = fetch_public_data(net.client, h, dest, tokenizer_ident=TOK.ident, wait=20)
    assert report.downloaded == [e.name for e in shard.manifest] and not report.skipped
    assert report.providers == [net.honest.peer_id] and not report.refused
    assert report.bytes_downloaded == sum(e.size for e in shard.manifest) > (1 << 20)
    for e in shard.manifest:
        assert _sha(dest / e.name) == e.sha256 == _sha(e.path)
    assert _shard(dest, net.spec).manifest_hash == h, "a shard over the fetched folder has the public manifest"
    assert sorted(p.name for p in dest.rglob(".*")) == [MANIFEST_FILE], "no temporaries left"

    # resume: a complete copy needs no provider; a missing and a damaged file are fetched again, the rest kept
    net.honest_server.stop()
    again = fetch_public_data(net.client, h, dest, tokenizer_ident=TOK.ident, wait=0)
    assert not again.downloaded and again.skipped == report.downloaded and again.bytes_downloaded == 0
    net.honest_server.serve(m, paths)
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (dest / "a.txt", dest / "z-large.txt")}
    (dest / "pkg" / "mod.py").unlink()
    damaged = dest / "pkg" / "sub" / "deep.txt"
    damaged.write_bytes(b"X" * damaged.stat().st_size)
    third = fetch_public_data(net.client, h, dest, tokenizer_ident=TOK.ident, wait=20)
    assert third.downloaded == ["pkg/mod.py", "pkg/sub/deep.txt"]
    assert sorted(third.skipped) == ["a.txt", "pkg.txt", "z-large.txt"]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept, "present files are not rewritten"
    assert _shard(dest, net.spec).manifest_hash == h


def _jsonl_with_field(src: Path, dest: Path, field: str) -> Path:
    """The files under `src` as documents of a JSONL file whose text is in `field`; every line also has a
    decoy "text" field, so that reading the default field gives other tokens."""
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", encoding="utf-8") as f:
        for p in files:
            f.write(json.dumps({"text": f"decoy {p.name} " * 30, field: p.read_text(encoding="utf-8")}) + "\n")
    return dest


def test_the_manifest_carries_a_non_default_text_field_so_a_fetcher_reads_the_same_tokens(
        net: Net, tmp_path: Path) -> None:
    """A public shard in JSONL with its text in "content": the served manifest hashes like the shard
    (the text field is part of the hash), and the fetcher learns the field from it and gets the same tokens."""
    data = _make_data(tmp_path / "src", seed=5)
    jsonl = _jsonl_with_field(data, tmp_path / "public" / "docs.jsonl", "content")
    opts = DataOptions(text_field="content")
    shard = Shard([jsonl.parent], TOK, seq_len=net.spec.data.seq_len, val_fraction=net.spec.data.val_fraction,
                  options=opts)
    plain = Shard([jsonl.parent], TOK, seq_len=net.spec.data.seq_len, val_fraction=net.spec.data.val_fraction)
    assert shard.manifest_hash != plain.manifest_hash and not np.array_equal(shard.tokens, plain.tokens)
    m = shard_manifest(shard)
    assert m.text_field == "content" and m.hash == shard.manifest_hash
    assert Manifest.from_dict(m.to_dict()) == m, "the text field survives the wire"
    assert "text_field" not in shard_manifest(plain).to_dict(), "a default text field leaves the wire as it was"
    with pytest.raises(ValueError, match="text_field"):
        Manifest.from_dict({**m.to_dict(), "text_field": 7})
    h = net.honest_server.serve(m, {e.sha256: e.path for e in shard.manifest})
    assert h == shard.manifest_hash

    dest = tmp_path / "fetched"
    report = fetch_public_data(net.client, h, dest, tokenizer_ident=TOK.ident, wait=20)
    assert report.text_field == "content" and report.downloaded == ["docs.jsonl"]
    again = fetch_public_data(net.client, h, dest, tokenizer_ident=TOK.ident, wait=0)
    assert again.text_field == "content" and not again.downloaded, "a complete local copy names its field too"
    fetched = Shard([dest], TOK, seq_len=net.spec.data.seq_len, val_fraction=net.spec.data.val_fraction,
                    options=DataOptions(text_field=report.text_field))
    assert fetched.manifest_hash == h and np.array_equal(fetched.tokens, shard.tokens)


@pytest.mark.slow
def test_a_provider_serving_wrong_bytes_is_refused_by_name(net: Net, tmp_path: Path) -> None:
    data = _make_data(tmp_path / "public", seed=2)
    m, paths = _manifest(_shard(data, net.spec))
    h = net.honest_server.serve(m, paths)
    tampered = tmp_path / "tampered"
    shutil.copytree(data, tampered)
    raw = bytearray((tampered / "pkg" / "mod.py").read_bytes())
    raw[100] ^= 1  # one flipped bit, same size
    (tampered / "pkg" / "mod.py").write_bytes(bytes(raw))
    net.bad_server.serve(m, {sha: tampered / p.relative_to(data) for sha, p in paths.items()})

    dest = tmp_path / "fetched"
    report = fetch_public_data(net.client, h, dest, wait=20,
                               rng=_seed_trying_first(net.bad.peer_id, net.honest.peer_id))
    assert list(report.refused) == [net.bad.peer_id]
    assert "'pkg/mod.py'" in report.refused[net.bad.peer_id] and "do not hash" in report.refused[net.bad.peer_id]
    assert report.providers[-1] == net.honest.peer_id
    assert _shard(dest, net.spec).manifest_hash == h
    assert all(_sha(dest / p.relative_to(data)) == sha for sha, p in paths.items())


@pytest.mark.slow
def test_a_stalled_provider_is_left_and_the_next_resumes_at_the_offset(net: Net, tmp_path: Path) -> None:
    data = _make_data(tmp_path / "public", seed=3)
    m, paths = _manifest(_shard(data, net.spec))
    h = net.honest_server.serve(m, paths)
    net.bad_server.serve(m, paths)
    net.bad_server.modes[h] = "stall"
    dest = tmp_path / "fetched"
    report = fetch_public_data(net.client, h, dest, timeout=2, wait=20,
                               rng=_seed_trying_first(net.bad.peer_id, net.honest.peer_id))
    assert "stopped after 1,048,576 of" in report.refused[net.bad.peer_id], report.refused
    large = next(f for f in m.files if f.name == "z-large.txt")
    # the bad provider's first MiB of the first file was kept: the honest one sent only the rest
    assert report.bytes_downloaded == m.total_bytes, "every byte fetched once: the honest peer resumed mid-file"
    assert _sha(dest / "z-large.txt") == large.sha256
    assert _shard(dest, net.spec).manifest_hash == h


@pytest.mark.slow
def test_an_oversized_answer_is_refused_and_nothing_half_written_stays(net: Net, tmp_path: Path) -> None:
    data = _make_data(tmp_path / "public", seed=4)
    m, paths = _manifest(_shard(data, net.spec))
    h = net.bad_server.serve(m, paths)
    net.bad_server.modes[h] = "oversize"
    dest = tmp_path / "fetched"
    with pytest.raises(PublicDataFetchError, match="oversized") as err:
        fetch_public_data(net.client, h, dest, wait=2)
    assert net.bad.peer_id in str(err.value) and "--data" in str(err.value)
    assert _leftovers(dest) == [], "no temporary file stays after a failed fetch"


@pytest.mark.slow
def test_a_lying_or_unsafe_manifest_is_refused_and_nothing_is_written(net: Net, tmp_path: Path) -> None:
    data = _make_data(tmp_path / "public", seed=5)
    m, paths = _manifest(_shard(data, net.spec))
    h = net.bad_server.serve(m, paths)
    net.bad_server.manifest_lies[h] = Manifest(m.files[1:], m.tokenizer)  # announced under h, hashes otherwise
    with pytest.raises(PublicDataFetchError, match="hashes to") as err:
        fetch_public_data(net.client, h, tmp_path / "lied", wait=2)
    assert net.bad.peer_id in str(err.value)
    assert not (tmp_path / "lied").exists()

    # a manifest whose hash is the wanted one, but with a name that climbs out of the folder
    evil = Manifest((ManifestFile("../escaped.txt", m.files[0].sha256, m.files[0].size),), m.tokenizer)
    h_evil = net.bad_server.serve(evil, {m.files[0].sha256: paths[m.files[0].sha256]})
    dest = tmp_path / "box" / "fetched"
    with pytest.raises(PublicDataFetchError, match="cannot be written as a folder") as err:
        fetch_public_data(net.client, h_evil, dest, wait=5)
    assert "'..'" in str(err.value) and net.bad.peer_id in str(err.value)
    assert not dest.exists() and not (tmp_path / "box" / "escaped.txt").exists()


@pytest.mark.slow
def test_no_provider_is_a_clear_error(net: Net, tmp_path: Path) -> None:
    with pytest.raises(PublicDataFetchError, match="no peer announced it") as err:
        fetch_public_data(net.client, "ab" * 32, tmp_path / "none", wait=1)
    assert "--data" in str(err.value) and "--initial-peers" in str(err.value)
    assert not (tmp_path / "none").exists()
    with pytest.raises(PublicDataFetchError, match="64 lowercase hex"):
        fetch_public_data(net.client, "not-a-hash", tmp_path / "none", wait=0)


# ---- end to end --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_peer_without_data_fetches_the_public_shard_and_trains_in_the_swarm(
        tmp_path: Path, shards: list[Path], procs: list[subprocess.Popen]) -> None:
    """The public shard is JSONL with its text in "content" (the holder passes --text-field content): the
    fetcher, given neither --data nor --text-field, reads the field its manifest names."""
    probe = fast_spec()
    jsonl = _jsonl_with_field(shards[0], tmp_path / "public-src" / "docs.jsonl", "content")
    field_opts = DataOptions(text_field="content")
    public = Shard([jsonl.parent], TOK, seq_len=probe.data.seq_len, val_fraction=probe.data.val_fraction,
                   options=field_opts).manifest_hash
    spec = fast_spec(averaging={"matchmaking_timeout": 5.0, "join_timeout": 4.0, "allreduce_timeout": 8.0,
                                "commit_timeout": 4.0, "state_sync_timeout": 30.0, "min_group_size": 2},
                     verify={"fraction": 1.0, "public_data": public})
    spec_path = write_spec(spec, tmp_path / "spec.toml")
    holder, fetcher = tmp_path / "holder", tmp_path / "fetcher"
    rounds = 2
    start_peer(procs, holder, spec_path, jsonl.parent, rounds=rounds, extra=["--text-field", "content"])
    first = wait_ready(holder)["maddrs"][:1]
    start_peer(procs, fetcher, spec_path, None, rounds=rounds, initial=first)
    for p, w in zip(reversed(procs), (fetcher, holder), strict=True):  # the fetcher first: the holder waits for it
        assert wait_exit(p, w, timeout=300) == 0, f"{w.name}:\n{log_tail(w)}\nholder:\n{log_tail(holder)}"
    log = (fetcher / "peer.log").read_text()
    assert "fetched public data" in log, log_tail(fetcher)
    fetched = fetcher / "public" / public
    assert Shard([fetched], TOK, seq_len=probe.data.seq_len, val_fraction=probe.data.val_fraction,
                 options=field_opts).manifest_hash == public
    assert "serving public data" in (holder / "peer.log").read_text()
    assert "replayed bits match" in log, "the fetcher replays the holder's round bit for bit on the fetched data"
    got = [model_hashes(w) for w in (holder, fetcher)]
    assert got[0] == got[1] and set(got[0]) >= set(range(rounds + 1)), got


@pytest.mark.slow
def test_without_data_a_swarm_that_does_not_verify_says_what_to_pass(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_peer_arguments(parser)
    back = options_from_args(parser.parse_args(options_to_argv(PeerOptions(spec=Path("s.toml"), data=[],
                                                                           workdir=tmp_path))))
    assert back.data == [], "`start` passes no --data on when none was given"

    spec_path = write_spec(fast_spec(), tmp_path / "spec.toml")
    out = subprocess.run([sys.executable, "-m", "swarmfold", "run", "--spec", str(spec_path), "--workdir",
                          str(tmp_path / "w"), "--api-port", "0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--data is required" in out.stderr and "verify.fraction = 0" in out.stderr
