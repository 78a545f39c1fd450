"""``tiergate``: serve, check a config, hash keys, show usage.

Exit codes: 0 good, 1 failed at run time, 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Sequence

import structlog

from gateway.config import Config, ConfigError, load_config
from gateway.logging import configure_logging

DEFAULT_CONFIG = os.environ.get("TIERGATE_CONFIG", "config.toml")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"tiergate: bad config: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    from gateway.runtime import StartupError
    from gateway.server import serve
    from policies import PolicyError

    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    try:
        if uvloop is not None:
            return uvloop.run(serve(config))
        return asyncio.run(serve(config))
    except (StartupError, PolicyError) as exc:
        structlog.get_logger("gateway").error("startup_refused", reason=str(exc))
        return 2
    except OSError as exc:
        structlog.get_logger("gateway").error("startup_failed", reason=str(exc))
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    env = dict(os.environ)
    print(f"config ok: {args.config}")
    server = config.server
    print(f"listen: http={server.http or 'off'} unix_socket={server.unix_socket or 'off'}"
          f" (mode {server.unix_socket_mode})")
    r = config.routing
    print(f"routing: policy={r.policy} retries={r.retries} first_token_timeout={r.first_token_timeout_s}s"
          f" inter_token_timeout={r.inter_token_timeout_s}s stream_failover={r.stream_failover}")
    print(f"ledger: {_redacted_url(config.redis.url)} on_unavailable={config.redis.on_unavailable}")
    print(f"keys: {len(config.keys)}")
    print("tiers (tried in this order):")
    for i, t in enumerate(config.tiers, 1):
        status = "enabled"
        if not t.enabled:
            status = "disabled"
        elif t.needs_key and t.resolve_api_key(env) is None:
            status = f"no key in {t.key_source}: will not serve"
        price = "free" if t.price.is_free else f"${t.price.input}/${t.price.output} per 1M in/out"
        print(f"  {i}. {t.name} [{t.kind}, {t.task}] model={t.model} via {t.location}")
        print(f"     answers: {', '.join(t.public_models)}; {price}; {status}")
    enabled = [t for t in config.tiers if t.enabled]
    names: list[str] = []
    for t in enabled:
        names.extend(m for m in t.public_models if m != "auto" and m not in names)
    print("routes:")
    for model in names:
        for task in ("chat", "embeddings"):
            order = [t.name for t in enabled if t.task == task and t.answers(model)]
            if order and any(model in t.public_models for t in enabled if t.task == task):
                print(f"  {model} ({task}) -> {' -> '.join(order)}")
    for task in ("chat", "embeddings"):
        auto = [t.name for t in enabled if t.task == task and "auto" in t.public_models]
        if auto:
            print(f"  any other name ({task}) -> {' -> '.join(auto)}")
    return 0


def _redacted_url(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://[redacted]@{rest.split('@', 1)[1]}"
    return url


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from tracking import hash_key

    key = args.key
    if key is None:
        key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not key:
        print("tiergate: no key given", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from tracking import generate_key, hash_key

    key = generate_key()
    print(f"key:    {key}")
    print(f"sha256: {hash_key(key)}")
    print("Put the sha256 in [[keys]]; give the key to its user. It is not shown again.")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from redis.exceptions import RedisError

    from tracking import KeyStore, LedgerUnavailableError, fetch_report, render_table

    try:
        report = asyncio.run(fetch_report(
            config.redis.url, config.redis.key_prefix, day=args.day, month=args.month,
            budgets=config.budgets, keys=KeyStore(config.keys),
        ))
    except (OSError, RedisError, LedgerUnavailableError) as exc:
        print(f"tiergate: cannot read usage from Redis: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"tiergate: bad --day or --month: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiergate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a config and print the resolved tiers and routes")
    c.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check)

    k = sub.add_parser("keys", help="API key helpers")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kh = ksub.add_parser("hash", help="print the sha256 of a key (argument, stdin, or prompt)")
    kh.add_argument("key", nargs="?")
    kh.set_defaults(func=cmd_keys_hash)
    kn = ksub.add_parser("new", help="make a new random key and print it with its sha256")
    kn.set_defaults(func=cmd_keys_new)

    u = sub.add_parser("usage", help="usage and budgets from the shared ledger")
    u.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    u.add_argument("--json", action="store_true")
    u.add_argument("--day", help="UTC day, YYYY-MM-DD (default today)")
    u.add_argument("--month", help="UTC month, YYYY-MM (default this month)")
    u.set_defaults(func=cmd_usage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
