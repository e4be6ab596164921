"""Offline contribution commands: contribute, merge, verify.

`verify` exit codes: 0 the replay agrees with the claim; 1 it does not, or the
contribution was tampered with; 2 the inputs given cannot check it (wrong base, data or
start state, missing files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from swarmfold.errors import ExitCode


def _emit(text: str) -> None:
    """The command's own output (stdout); logs go to stderr."""
    sys.stdout.write(text + "\n")


def _error(command: str, message: str) -> None:
    sys.stderr.write(f"swarmfold {command}: error: {message}\n")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def default_identity() -> Path:
    env = os.environ.get("SWARMFOLD_IDENTITY")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "swarmfold" / "identity.key"


def _add_threads(p: argparse.ArgumentParser, default: int | None) -> None:
    from swarmfold.cli.peer import add_device

    p.add_argument("--threads", type=int, default=default,
                   help="intra-op CPU threads; part of the determinism contract"
                        + (f" (default {default})" if default else " (default: the receipt's)"))
    add_device(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("contribute", help="train H steps from a checkpoint offline; write delta + signed receipt")
    p.add_argument("--spec", type=Path, default=None,
                   help="the swarm spec; must match the base checkpoint's (default: the base's)")
    p.add_argument("--base", required=True, help="the checkpoint to start from (a workdir or a checkpoint folder)")
    p.add_argument("--data", required=True, nargs="+", help="files, folders or globs of your shard")
    p.add_argument("--out", required=True, type=Path,
                   help="NAME.safetensors; the receipt goes to NAME.receipt.json beside it")
    p.add_argument("--rounds-of-steps", dest="steps", type=int, default=None,
                   help="inner steps H to train (default: the spec's round.inner_steps)")
    p.add_argument("--identity", type=Path, default=None,
                   help="identity key that signs the receipt and gives the peer id (default $SWARMFOLD_IDENTITY "
                        "or ~/.config/swarmfold/identity.key, created if missing; a daemon's is W/identity.key)")
    p.add_argument("--snapshot-every", dest="snapshot_interval", type=int, default=None,
                   help="keep a snapshot every N steps for `verify --spot-check` (default: verify.snapshot_interval)")
    p.add_argument("--inner-state", choices=["auto", "fresh", "checkpoint"], default="auto",
                   help="inner AdamW start: the base's own state when it is this peer's checkpoint (auto), "
                        "always fresh, or always the base's")
    p.add_argument("--json", action="store_true", help="print the signed receipt body as JSON")
    _add_threads(p, int(os.environ.get("SWARMFOLD_THREADS", "2")))
    p.set_defaults(handler=cmd_contribute)

    p = sub.add_parser("merge", help="combine contributions that share a base into a new checkpoint")
    p.add_argument("--base", required=True, help="the checkpoint the contributions were made from")
    p.add_argument("contributions", nargs="+", help="contribution files (NAME.safetensors or NAME.receipt.json)")
    p.add_argument("--method", choices=["mean", "task-arithmetic", "ties", "dare"], default="mean")
    p.add_argument("--weights", choices=["tokens", "equal"], default="tokens",
                   help="weigh each contribution by its tokens (as a live round does) or equally")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of each delta's entries kept")
    p.add_argument("--drop-rate", type=float, default=0.5, help="dare: fraction of entries dropped")
    p.add_argument("--scale", type=float, default=1.0, help="task-arithmetic and ties: multiplier of the merged delta")
    p.add_argument("--out", required=True, type=Path,
                   help="workdir to write the merged checkpoint in (OUT/checkpoints/round-NNNNNN)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("verify", help="replay a contribution's steps and check its delta (exit 0 pass, 1 fail)")
    p.add_argument("contribution", help="NAME.safetensors or NAME.receipt.json")
    p.add_argument("--base", required=True, help="the checkpoint the receipt names")
    p.add_argument("--data", required=True, nargs="+", help="the shard the receipt lists")
    p.add_argument("--spot-check", type=int, default=None, metavar="K",
                   help="replay only K random segments between the contributor's snapshots (the last always)")
    p.add_argument("--seed", type=int, default=None, help="seed for choosing spot-check segments (default: random)")
    p.add_argument("--json", action="store_true")
    _add_threads(p, None)
    p.set_defaults(handler=cmd_verify)


def cmd_contribute(args: argparse.Namespace) -> int:
    from swarmfold.averaging.identity import IdentityError, load_or_create_identity
    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.contribute import ContributeError, contribute
    from swarmfold.spec import load_spec

    try:
        spec = load_spec(args.spec) if args.spec else None
        identity = load_or_create_identity(args.identity or default_identity())
        result = contribute(ckpt=resolve_checkpoint(args.base), data=args.data, identity=identity, out=args.out,
                            threads=args.threads, spec=spec, steps=args.steps,
                            snapshot_interval=args.snapshot_interval, inner_state=args.inner_state,
                            device=args.device)
    except (ContributeError, IdentityError) as e:
        _error("contribute", str(e))
        return ExitCode.BAD_INPUT
    body = result.body
    if args.json:
        _emit(json.dumps(body))
        return ExitCode.OK
    _emit(f"contribution of peer {body['peer_id']}: {body['steps']} steps from round {body['base']['round']} "
          f"(model {body['base']['model_sha256'][:12]}…), {body['tokens']:,} tokens, "
          f"loss {body['losses'][0]:.4f} -> {body['losses'][-1]:.4f}")
    _emit(f"  delta    {result.delta_path}  sha256 {body['delta']['sha256'][:16]}…")
    _emit(f"  receipt  {result.receipt_path}  (signed, inner state: {body['inner_start']['source']})")
    if result.snapshot_paths:
        _emit(f"  {len(result.snapshot_paths)} snapshots every {body['snapshots']['interval']} steps for spot checks")
    return ExitCode.OK


def cmd_merge(args: argparse.Namespace) -> int:
    from swarmfold.averaging.merge import MergeError, MergeOptions
    from swarmfold.averaging.receipt import ContributionError
    from swarmfold.peer.contribute import merge_to_checkpoint

    options = MergeOptions(method=args.method, weights=args.weights, density=args.density,
                           drop_rate=args.drop_rate, scale=args.scale)
    try:
        path, result = merge_to_checkpoint(base=args.base, contributions=args.contributions, out=args.out,
                                           options=options)
    except (MergeError, ContributionError) as e:
        _error("merge", str(e))
        return ExitCode.BAD_INPUT
    if args.json:
        _emit(json.dumps({"checkpoint": str(path), "round": result.round, "model_sha256": result.model_sha256,
                          "aggregate_sha256": result.aggregate_sha256, "contributions": result.contributions}))
        return ExitCode.OK
    _emit(f"merged {len(result.contributions)} contributions with {args.method} ({args.weights} weights) "
          f"into {path}")
    for c in result.contributions:
        _emit(f"  {c['peer_id']}  weight {c['weight']:g}  {c['file']}")
    _emit(f"round {result.round}, model sha256 {result.model_sha256}")
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from swarmfold.averaging.receipt import ContributionError
    from swarmfold.averaging.verification import environment_class
    from swarmfold.peer.checkpoint import resolve_checkpoint
    from swarmfold.peer.verify import VerifyInputError, verify_file

    try:
        report = verify_file(args.contribution, ckpt=resolve_checkpoint(args.base), data=args.data,
                             threads=args.threads, spot_check=args.spot_check, seed=args.seed, device=args.device)
    except ContributionError as e:
        if args.json:
            _emit(json.dumps({"passed": False, "refused": True, "reason": str(e)}))
        else:
            _emit(f"FAIL (refused): {e}")
        return ExitCode.FAILURE
    except VerifyInputError as e:
        _error("verify", str(e))
        return ExitCode.BAD_INPUT
    if args.json:
        _emit(json.dumps(report.to_dict()))
    else:
        verdict = "PASS" if report.passed else "FAIL"
        how = "bitwise" if report.mode == "bitwise" else "by tolerance"
        _emit(f"{verdict} {how}: {report.reason}")
        _emit(f"  peer {report.peer_id}, {report.steps_replayed} of {report.steps_claimed} steps replayed, "
              f"relative distance {_fmt(report.distance)}, largest loss difference {_fmt(report.loss_max_abs_diff)}")
        if not report.same_environment:
            claimed, here = (environment_class(report.environment_claimed),
                             environment_class(report.environment_here))
            diff = {k: (claimed[k], here[k]) for k in claimed if claimed[k] != here[k]}
            _emit(f"  environment differs (receipt, here): {diff}")
    return ExitCode.OK if report.passed else ExitCode.FAILURE
