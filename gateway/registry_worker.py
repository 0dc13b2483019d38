"""Validate a registry in a process of its own and leave its snapshot (issue 13).

A reload of changed registry files validates every row (phone numbers above all): seconds
of pure Python for a city. Done in the gateway's process, that work shares the GIL with
the event loop and delays alarms. The gateway runs this module instead::

    python -m gateway.registry_worker DIRECTORY --region CN [--bbox A,B,C,D] --cache DIR

It validates ``DIRECTORY`` exactly as :func:`gateway.registry.load_registry` does and
writes the validated snapshot into ``--cache``; the gateway then loads the snapshot
(a rebuild, no validation). Exit 0 with ``{"elders": N, ...}`` on stdout; 1 with the
registry's problems on stderr (as the gateway would log them); 2 for bad arguments.

It runs at a lower CPU priority than the gateway (:data:`NICE_INCREMENT`): on a small
edge box its seconds of validation would otherwise take a core from intake and dispatch
while alarms keep coming; a reload may take longer, an alarm must not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

#: Added to the niceness this process inherits from the gateway (never needs privileges).
NICE_INCREMENT = 10


def _bbox(text: str) -> tuple[float, float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("bbox is min_lon,min_lat,max_lon,max_lat")
    return parts[0], parts[1], parts[2], parts[3]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gateway.registry_worker", description=__doc__)
    p.add_argument("directory", type=Path)
    p.add_argument("--region", default="CN")
    p.add_argument("--bbox", type=_bbox, default=None)
    p.add_argument("--cache", type=Path, required=True)
    args = p.parse_args(argv)
    os.nice(NICE_INCREMENT)
    # Imported only now: importing them (phonenumbers, pydantic) is CPU too.
    from gateway.logs import configure_logging
    from gateway.registry import RegistryError, load_registry, registry_summary

    configure_logging("warning", "json", sys.stderr)  # stdout carries the answer alone
    try:
        registry = load_registry(args.directory, default_region=args.region, bbox=args.bbox,
                                 cache_dir=args.cache, write_cache=True)
    except (RegistryError, ValueError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(registry_summary(registry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
