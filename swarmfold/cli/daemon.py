"""Background commands: start, stop, status, pause, resume, logs.

`start` takes the same options as `run` and detaches; the others find the running peer
through its workdir (daemon.pid, api.json, control.token). Exit codes: see swarmfold.cli.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from swarmfold.errors import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    from swarmfold.daemon.options import add_peer_arguments

    p = sub.add_parser("start", help="start a peer in the background (same options as run)")
    add_peer_arguments(p)
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds to wait for the peer to come up (default 180)")
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser("stop", help="stop a background peer: it leaves the round cleanly and checkpoints")
    _workdir(p)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for a clean exit (default: stop_timeout_s from settings, 300)")
    p.add_argument("--force", action="store_true", help="SIGKILL the peer if it has not exited by then")
    p.set_defaults(handler=cmd_stop)

    p = sub.add_parser("status", help="state, round, peers, loss, tokens/s and checkpoint age of a peer")
    _workdir(p)
    p.add_argument("--json", action="store_true", help="print the full status JSON")
    p.add_argument("--check", action="store_true",
                   help="print nothing; exit 0 only if the peer's API answers (for health checks)")
    p.set_defaults(handler=cmd_status)

    for name, text in (("pause", "pause training (the peer stays in the swarm and serves state sync)"),
                       ("resume", "resume training after `swarmfold pause`")):
        p = sub.add_parser(name, help=text)
        _workdir(p)
        p.set_defaults(handler=cmd_pause if name == "pause" else cmd_resume)

    p = sub.add_parser("logs", help="show a peer's log")
    _workdir(p)
    p.add_argument("-n", "--lines", type=int, default=50, help="lines from the end (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    p.add_argument("--stdio", action="store_true",
                   help="the detached peer's raw stdout/stderr (tracebacks, native libraries) instead")
    p.set_defaults(handler=cmd_logs)


def _workdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, type=Path, help="the peer's workdir")


def _err(command: str, message: str) -> None:
    print(f"swarmfold {command}: {message}", file=sys.stderr)


# ---- talking to a running peer --------------------------------------------------------
class ApiUnavailable(ConnectionError):
    pass


def api_call(workdir: Path, path: str, *, method: str = "GET", token: str | None = None,
             timeout: float = 5.0) -> Any:
    from swarmfold.daemon.api import read_api_file

    info = read_api_file(workdir)
    if info is None:
        raise ApiUnavailable(f"no control API recorded in {workdir}/api.json (not running, or api_port 0)")
    req = urllib.request.Request(info["url"].rstrip("/") + path, method=method,
                                 data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise ApiUnavailable(f"{info['url']} answered {e.code}: {detail}") from e
    except (OSError, ValueError) as e:
        raise ApiUnavailable(f"the peer's API at {info['url']} does not answer ({e})") from e


# ---- start / stop ---------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    from swarmfold.daemon.lifecycle import StartFailed, WorkdirLocked, log_path, start_detached
    from swarmfold.daemon.options import options_from_args, options_to_argv
    from swarmfold.daemon.settings import SettingsError, load_settings
    from swarmfold.spec import load_spec

    options = options_from_args(args)
    load_spec(options.spec)  # a bad spec fails here, with its message, not in the background
    try:
        settings = load_settings(options.workdir)
    except SettingsError as e:
        _err("start", str(e))
        return ExitCode.BAD_INPUT
    from swarmfold.peer.device import resolve_device

    # a missing device fails here too (settings.toml's device applies when --device was not given)
    resolve_device(options.device if options.device_explicit or settings.device is None else settings.device)
    api_port = settings.api_port if options.api_port is None else options.api_port
    try:
        started = start_detached(options_to_argv(options), options.workdir, api_enabled=api_port != 0,
                                 ready_timeout=args.ready_timeout)
    except WorkdirLocked as e:
        _err("start", str(e))
        return ExitCode.LOCKED
    except StartFailed as e:
        _err("start", str(e))
        return e.code if e.code in (ExitCode.BAD_INPUT, ExitCode.LOCKED) else ExitCode.FAILURE
    print(f"started swarmfold peer (pid {started.pid}) in {options.workdir}")
    summary = (started.status or {}).get("data")
    if summary:
        print(summary)  # the shard's summary line: files, bytes, tokens, skipped by reason
    if started.api:
        print(f"dashboard: {started.api['url']}")
        for addr in (started.status or {}).get("visible_maddrs", []):
            print(f"join with: --initial-peers {addr}")
    print(f"log:       {log_path(options.workdir)}")
    print(f"stop with: swarmfold stop --workdir {options.workdir}")
    return ExitCode.OK


def cmd_stop(args: argparse.Namespace) -> int:
    from swarmfold.daemon.lifecycle import stop_daemon
    from swarmfold.daemon.settings import SettingsError, load_settings

    timeout = args.timeout
    if timeout is None:
        try:
            timeout = load_settings(args.workdir).stop_timeout_s
        except SettingsError as e:
            _err("stop", f"{e}; using the default stop timeout")
            timeout = 300.0
    message, code = stop_daemon(args.workdir, timeout=timeout, force=args.force)
    if code == 0:
        print(message)
    else:
        _err("stop", message)
    return code


# ---- status ---------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from swarmfold.daemon.lifecycle import newest_checkpoint, read_exit_file, running_pid

    try:
        snap = api_call(args.workdir, "/api/status", timeout=3.0)
    except ApiUnavailable as e:
        if args.check:
            return ExitCode.FAILURE
        pid = running_pid(args.workdir)
        offline = {"running": pid is not None, "pid": pid, "api_error": str(e),
                   "newest_checkpoint": newest_checkpoint(args.workdir), "last_exit": read_exit_file(args.workdir)}
        print(json.dumps(offline, indent=1) if args.json else format_offline(args.workdir, offline))
        return ExitCode.OK if pid is not None else ExitCode.FAILURE
    if args.check:
        return ExitCode.OK
    print(json.dumps(snap, indent=1) if args.json else format_status(snap))
    return ExitCode.OK


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago"


def _state_line(snap: dict[str, Any]) -> str:
    state, reason = snap.get("state", "?"), snap.get("reason") or ""
    pauses = snap.get("pause_reasons") or {}
    if pauses and state != "paused":
        reason = f"pause requested ({'; '.join(pauses.values())}); it pauses when this round ends"
    elif pauses:
        reason = "; ".join(pauses.values())
    return f"{state}" + (f" ({reason})" if reason else "")


def _tokens_line(snap: dict[str, Any]) -> str:
    """'12,000 trained, 9,000 reached the swarm's model, 3,000 wasted' (+ pending, when any)."""
    trained = int(snap.get("tokens_total", 0))
    if "tokens_counted" not in snap:  # a peer of an older version
        return f"{trained:,} trained by this peer"
    line = (f"{trained:,} trained, {int(snap['tokens_counted']):,} reached the swarm's model, "
            f"{int(snap.get('tokens_wasted', 0)):,} wasted")
    pending = int(snap.get("tokens_pending", 0))
    return line + (f", {pending:,} pending" if pending else "")


def format_status(snap: dict[str, Any]) -> str:
    s = snap.get("summary", {})
    agree = s.get("hash_agreement", {})
    loss = snap.get("loss")
    lines = [
        f"swarmfold peer {snap.get('peer_id') or '(joining)'} (pid {snap.get('pid')}) in {snap.get('workdir')}",
        f"  state       {_state_line(snap)}",
        f"  device      {snap.get('device') or '—'}" + (f", {snap['precision']}" if snap.get("precision") else ""),
        f"  round       {snap.get('round')}"
        + (f"  (swarm newest {agree['round']}: {agree['agree']} of {agree['at_round']} peers there hold the same "
           f"model" + (f"; {agree['behind']} behind" if agree.get("behind") else "") + ")"
           if agree.get("round") is not None else ""),
        f"  peers seen  {s.get('peers_alive', 0)} alive (this one included)",
        "  loss        " + ("—" if loss is None else f"{loss:.4f}")
        + ("" if s.get("loss_mean") is None else f"  (swarm mean {s['loss_mean']:.4f})"),
        f"  tokens/s    {snap.get('tokens_per_second', 0):,.0f}  (swarm {s.get('swarm_tokens_per_second', 0):,.0f}; "
        f"this peer's share {s.get('my_share', 0):.0%})",
        f"  tokens      {_tokens_line(snap)}",
        f"  checkpoint  {_age(snap.get('last_checkpoint_age_s'))}"
        + (f"  ({snap['last_checkpoint_path']})" if snap.get("last_checkpoint_path") else ""),
        f"  dashboard   {snap.get('api', {}).get('url', '')}",
    ]
    lines += [f"  join with   --initial-peers {a}" for a in snap.get("visible_maddrs", [])[:3]]
    return "\n".join(lines)


def format_offline(workdir: Path, info: dict[str, Any]) -> str:
    ckpt, last = info.get("newest_checkpoint"), info.get("last_exit")
    if info["running"]:
        head = f"running (pid {info['pid']}), but its control API does not answer: {info['api_error']}"
    else:
        head = f"not running: no peer holds {workdir}"
    lines = [head]
    if ckpt:
        lines.append(f"  newest checkpoint  round {ckpt['round']}, written {_age(time.time() - ckpt['time'])} "
                     f"({ckpt['path']})")
    else:
        lines.append("  newest checkpoint  none")
    if last and not info["running"]:
        lines.append(f"  last exit          code {last.get('code')} {_age(time.time() - float(last.get('time', 0)))}")
    return "\n".join(lines)


# ---- pause / resume / logs --------------------------------------------------------------
def _control(args: argparse.Namespace, action: str) -> int:
    from swarmfold.daemon.api import read_token

    try:
        result = api_call(args.workdir, f"/api/{action}", method="POST", token=read_token(args.workdir))
    except ApiUnavailable as e:
        _err(action, str(e))
        return ExitCode.FAILURE
    reasons = result.get("pause_reasons") or {}
    if action == "pause":
        print("paused: the peer finishes the round it is in, then skips rounds (it stays in the swarm)")
    elif reasons:
        print(f"your pause is lifted, but the peer stays paused: {'; '.join(reasons.values())}")
    else:
        print("resumed: the peer catches up with the swarm and trains again")
    return ExitCode.OK


def cmd_pause(args: argparse.Namespace) -> int:
    return _control(args, "pause")


def cmd_resume(args: argparse.Namespace) -> int:
    return _control(args, "resume")


def cmd_logs(args: argparse.Namespace) -> int:
    from swarmfold.daemon.lifecycle import LOG_DIR, STDIO_FILE, follow, log_path, tail_lines

    path = args.workdir / LOG_DIR / STDIO_FILE if args.stdio else log_path(args.workdir)
    if not path.exists() and not args.follow:
        _err("logs", f"{path} does not exist; has a peer run in {args.workdir}?")
        return ExitCode.FAILURE
    for line in tail_lines(path, args.lines):
        print(line)
    if args.follow:
        sys.stdout.flush()
        try:
            for line in follow(path):
                print(line, flush=True)
        except KeyboardInterrupt:
            pass
    return ExitCode.OK
