"""The ``dawnchorus bench build`` command: build a benchmark domain from its spec."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from dawnchorus.edge.progress import add_progress_argument
from dawnchorus.models.birdnet import default_cache_dir

# Built domains sit beside the BirdNET model files; a build of the two mixed
# domains is about 20 MB of manifests and embeddings.
DEFAULT_CACHE = default_cache_dir() / "bench"


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``dawnchorus bench build``."""
    parser.add_argument("spec", type=pathlib.Path, help="domain spec (TOML), e.g. benchmarks/domains/europe.toml")
    parser.add_argument("--cache", type=pathlib.Path, default=DEFAULT_CACHE,
                        help="folder of built domains (default: %(default)s)")
    parser.add_argument("--data-root", type=pathlib.Path, default=None,
                        help="root of the paths in the spec (default: ../shared/data beside the repository)")
    add_progress_argument(parser)


def run_build(args: argparse.Namespace) -> int:
    """Build the domain of ``args.spec``, print a summary and return the exit status."""
    # Imported here because the domains need scipy, which a recorder's edge-only install lacks,
    # and the ``dawnchorus`` parser imports this module for every command.
    from dawnchorus.edge.audio import AudioError
    from dawnchorus.evaluation.domains import DomainSpecError, build_domain, load_spec

    try:
        spec = load_spec(args.spec)
        folder = build_domain(spec, args.cache, args.data_root, progress=getattr(args, "progress", True))
    except (DomainSpecError, AudioError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    share = stats["neighbours"].get("same_background_share")
    share_text = "n/a" if share is None else f"{share:.1%}"
    print(f"{spec.name}: {stats['windows']} windows, {stats['classes']} classes, "
          f"{stats['labeled_species']} labeled species, {stats['bird_free_share']:.1%} bird-free, "
          f"{share_text} of mutual neighbour pairs share a background; "
          f"built in {stats['build_seconds']} s into {folder}")
    return 0
