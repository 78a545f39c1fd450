"""Compare the running environment with requirements.lock.

    python scripts/lock_check.py requirements.lock            exit 1 unless every locked
                                                             package installed here has
                                                             the lock's version
    python scripts/lock_check.py requirements.lock --drift    list what differs from the
                                                             lock (after setup.sh --latest)
    --own-torch                                              leave torch and its CUDA
                                                             libraries out (TORCH_SPEC)

Run it with the venv's interpreter: it reads that environment's installed distributions.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

OWN_TORCH = re.compile(r"^(torch|triton|nvidia-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not a pin: {line!r}")
        pins[canonical(name)] = version.split(";", 1)[0].strip()
    return pins


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    found.pop("tiergate", None)  # the project itself, installed editable
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--drift", action="store_true", help="report differences, exit 0")
    parser.add_argument("--own-torch", action="store_true", help="skip torch and CUDA libraries")
    args = parser.parse_args(argv)
    pins, have = locked(args.lock), installed()
    if args.own_torch:
        pins = {n: v for n, v in pins.items() if not OWN_TORCH.match(n)}
        have = {n: v for n, v in have.items() if not OWN_TORCH.match(n)}
    moved = sorted((n, pins[n], have[n]) for n in pins.keys() & have.keys() if pins[n] != have[n])
    unlocked = sorted(n for n in have.keys() - pins.keys() if not (args.own_torch and OWN_TORCH.match(n)))
    if args.drift:
        for name, was, now in moved:
            print(f"drift: {name} {was} (lock) -> {now}")
        for name in unlocked:
            print(f"drift: {name} {have[name]} (not in the lock)")
        print(f"lock check: {len(moved)} moved, {len(unlocked)} new, against {args.lock}")
        return 0
    for name, was, now in moved:
        print(f"lock mismatch: {name} is {now}, the lock says {was}", file=sys.stderr)
    for name in unlocked:
        print(f"lock warning: {name} {have[name]} is installed but not in the lock "
              "(left from an earlier install, or the lock is stale: scripts/update-lock.sh)",
              file=sys.stderr)
    if moved:
        print(f"lock check failed: {len(moved)} packages differ from {args.lock}", file=sys.stderr)
        return 1
    print(f"lock check: {len(pins.keys() & have.keys())} packages at the lock's versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
