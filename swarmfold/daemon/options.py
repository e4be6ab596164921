"""Options of one running peer, shared by `swarmfold run` (foreground) and `swarmfold start` (background)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class PeerOptions:
    spec: Path
    data: list[str]
    workdir: Path
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    announce_data: list[str] = field(default_factory=list)  # HOST:PORT where peers dial our direct streams
    data_port: int | None = None  # None: the spec's network.data_port
    rounds: int | None = None  # stop after this many rounds are done (None: run until stopped)
    threads: int = 2
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    keep_checkpoints: int = 3
    api_port: int | None = None  # None: from settings; 0: disabled
    api_host: str | None = None  # None: from settings (127.0.0.1)
    allow_remote_api: bool = False  # required to serve the API on a non-loopback address
    initial_peers_from: list[str] = field(default_factory=list)  # status URLs of running peers to join
    threads_explicit: bool = True  # False: --threads was not given, so settings.toml may set it
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (peer/device.py resolve_device)
    device_explicit: bool = True  # False: --device was not given, so settings.toml may set it
    activation_checkpointing: bool = False  # recompute activations in backward (local: the same bits)
    text_field: str = "text"  # JSONL field / Parquet and Arrow column of the text (peer/data.py DataOptions)
    max_file_mb: float = 16.0  # text and JSONL files larger than this are skipped
    strict_data: bool = False  # refuse the shard at the first file that cannot be used, instead of skipping it
    wait_for_peers: int = 0  # a launch: train the first round only once this many peers (us included) are seen

    def data_options(self) -> Any:
        from swarmfold.peer.data import DataOptions

        return DataOptions(text_field=self.text_field, max_file_mb=self.max_file_mb, strict=self.strict_data)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """How a shard reads its files: --text-field, --max-file-mb, --strict (see peer/data.py)."""
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the field of JSONL lines and the column of Parquet/Arrow files that holds the text "
                        "(default text)")
    p.add_argument("--max-file-mb", type=_positive_float, default=16.0, metavar="MB",
                   help="skip text and JSONL files larger than this many MiB (default 16; Parquet and Arrow "
                        "are streamed and have no cap)")
    p.add_argument("--strict", dest="strict_data", action="store_true",
                   help="refuse the shard at the first file that cannot be used (binary, not UTF-8, too big, "
                        "no text field) instead of skipping it")


def int_at_least(text: str, minimum: int, note: str = "") -> int:
    """argparse type body: an integer >= `minimum` (a usage error naming the bound, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}{note}, got {value}")
    return value


def _peer_count(text: str) -> int:
    return int_at_least(text, 0, " (0: do not wait)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def add_peer_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `run` and `start` (the same for both)."""
    p.add_argument("--spec", required=True, type=Path, help="the swarm spec (TOML)")
    p.add_argument("--data", nargs="+", default=[],
                   help="files, folders or globs of this peer's shard (required unless the swarm verifies by "
                        "replay: then a peer without --data fetches the public shard from peers)")
    p.add_argument("--workdir", required=True, type=Path, help="checkpoints, identity key, logs, token")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                   help="multiaddrs of peers to join (in addition to the spec's bootstrap_peers)")
    p.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"], metavar="MULTIADDR",
                   help="where to listen (default /ip4/0.0.0.0/tcp/0; use /ip4/127.0.0.1/tcp/0 for local only)")
    p.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MULTIADDR",
                   help="public addresses to announce (behind NAT with port forwarding)")
    p.add_argument("--announce-data", nargs="*", default=[], type=_host_port, metavar="HOST:PORT",
                   help="where other peers dial this peer's direct streams (the all-reduce's bulk bytes; "
                        "network.data_port is where it listens): needed with --announce-maddrs, else those "
                        "streams go through libp2p")
    p.add_argument("--data-port", type=_port, default=None, metavar="PORT",
                   help="TCP port of this peer's direct streams (default: the spec's network.data_port, 0 = any "
                        "free port); give a fixed one to open in a firewall")
    p.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: run until stopped)")
    p.add_argument("--threads", type=int, action=_Explicit, default=int(os.environ.get("SWARMFOLD_THREADS", "2")),
                   help="intra-op CPU threads; part of the determinism contract "
                        "(default: $SWARMFOLD_THREADS, else threads in settings.toml, else 2)")
    p.add_argument("--device", action=_Explicit, default=os.environ.get("SWARMFOLD_DEVICE", "auto"),
                   metavar="DEVICE", help="training device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or "
                   "mps; the averaging stays on the CPU (default: $SWARMFOLD_DEVICE, else device in "
                   "settings.toml, else auto)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~1/3 more compute, "
                        "the same bits (a local setting, not part of the spec)")
    p.add_argument("--client-mode", action="store_true",
                   help="accept no incoming connections: send contributions but never reduce (behind NAT)")
    p.add_argument("--no-relay", dest="use_relay", action="store_false",
                   help="do not use libp2p circuit relays")
    p.add_argument("--auto-relay", dest="use_auto_relay", action="store_true",
                   help="look for relays automatically and announce relayed addresses (behind NAT)")
    p.add_argument("--keep", dest="keep_checkpoints", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--api-port", type=int, default=None,
                   help="control API / dashboard port on 127.0.0.1 (default from settings; 0 disables)")
    p.add_argument("--api-host", default=None,
                   help="address of the control API (default from settings: 127.0.0.1)")
    p.add_argument("--allow-remote-api", action="store_true",
                   help="allow --api-host to be a non-loopback address (e.g. 0.0.0.0 in a container)")
    p.add_argument("--wait-for-peers", type=_peer_count, default=0, metavar="N",
                   help="a coordinated launch: start the first round only once N peers (this one included) "
                        "are in the swarm, so that they all meet in its averaging; default 0, start at once")
    p.add_argument("--initial-peers-from", nargs="*", default=[], metavar="URL",
                   help="join the peers whose control API is at URL (e.g. http://peer1:8470), "
                        "waiting for them to come up; for containers, where addresses are not known ahead")
    add_data_arguments(p)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535; 0: any free port)")
    return int(text)


def _host_port(text: str) -> str:
    from swarmfold.averaging.direct import parse_addr
    try:
        parse_addr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _Explicit(argparse.Action):
    """Stores the value and notes that it was given, so settings.toml may fill in only what was not."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_explicit", True)


def options_from_args(args: argparse.Namespace) -> PeerOptions:
    return PeerOptions(spec=args.spec, data=list(args.data), workdir=args.workdir,
                       initial_peers=list(args.initial_peers), host_maddrs=list(args.host_maddrs),
                       announce_maddrs=list(args.announce_maddrs), announce_data=list(args.announce_data),
                       data_port=args.data_port,
                       rounds=args.rounds, threads=args.threads,
                       client_mode=args.client_mode, use_relay=args.use_relay,
                       use_auto_relay=args.use_auto_relay, keep_checkpoints=args.keep_checkpoints,
                       api_port=args.api_port, api_host=args.api_host, allow_remote_api=args.allow_remote_api,
                       initial_peers_from=list(args.initial_peers_from),
                       threads_explicit=getattr(args, "threads_explicit", False)
                       or "SWARMFOLD_THREADS" in os.environ,
                       device=args.device, device_explicit=getattr(args, "device_explicit", False)
                       or "SWARMFOLD_DEVICE" in os.environ,
                       activation_checkpointing=bool(getattr(args, "activation_checkpointing", False)),
                       text_field=args.text_field, max_file_mb=args.max_file_mb, strict_data=args.strict_data,
                       wait_for_peers=args.wait_for_peers)


def options_to_argv(o: PeerOptions) -> list[str]:
    """The arguments that `add_peer_arguments` parses back into `o` (paths made absolute), for `start`."""
    argv = ["--spec", str(Path(o.spec).absolute()), "--workdir", str(Path(o.workdir).absolute()),
            "--keep", str(o.keep_checkpoints)]
    if o.data:
        argv += ["--data", *[os.path.abspath(d) for d in o.data]]
    for flag, values in (("--initial-peers", o.initial_peers), ("--host-maddrs", o.host_maddrs),
                         ("--announce-maddrs", o.announce_maddrs), ("--announce-data", o.announce_data),
                         ("--initial-peers-from", o.initial_peers_from)):
        if values:
            argv += [flag, *values]
    if o.threads_explicit:
        argv += ["--threads", str(o.threads)]
    if o.device_explicit:
        argv += ["--device", o.device]
    if o.activation_checkpointing:
        argv += ["--activation-checkpointing"]
    if o.wait_for_peers:
        argv += ["--wait-for-peers", str(o.wait_for_peers)]
    for flag, value in (("--rounds", o.rounds), ("--api-port", o.api_port), ("--api-host", o.api_host),
                        ("--data-port", o.data_port)):
        if value is not None:
            argv += [flag, str(value)]
    if o.text_field != "text":
        argv += ["--text-field", o.text_field]
    if o.max_file_mb != 16.0:
        argv += ["--max-file-mb", repr(o.max_file_mb)]
    for flag, on in (("--strict", o.strict_data), ("--client-mode", o.client_mode), ("--no-relay", not o.use_relay),
                     ("--auto-relay", o.use_auto_relay), ("--allow-remote-api", o.allow_remote_api)):
        if on:
            argv.append(flag)
    return argv
