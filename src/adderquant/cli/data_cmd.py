"""``adderquant data fetch``: download, verify and unpack a dataset."""

from __future__ import annotations

import argparse

from adderquant import hub
from adderquant.data.fetch import SOURCES, fetch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download datasets")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = actions.add_parser(
        "fetch",
        help="download an official dataset, verify its md5 and unpack it",
        description="Download to FILE.part (an interrupted download resumes when run again), "
        "verify the md5, then unpack; the result is used with --data DIR.",
    )
    f.add_argument("name", choices=tuple(SOURCES), help="dataset")
    f.add_argument("--to", default=None, metavar="DIR",
                   help="folder to put the dataset in (default: the cache, "
                   "$ADDERQUANT_HOME/data, where every command finds it)")
    f.add_argument(
        "--url", default=None,
        help="mirror: the archive's URL (CIFAR) or the folder URL holding the four .gz files "
        "(Fashion-MNIST); default: the official one, or under $ADDERQUANT_BASE_URL. The "
        "official md5s apply unless $ADDERQUANT_CHECKSUMS declares others",
    )
    f.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    f.set_defaults(func=run_fetch, output_dirs={"to": ()})


def run_fetch(args: argparse.Namespace) -> int:
    to = args.to or hub.cache_dir() / "data"
    folder = fetch(args.name, to, url=args.url or hub.dataset_mirror_url(args.name),
                   checksums=hub.checksum_overrides(), progress=not args.no_progress)
    print(f"{args.name} ready in {folder}" + (f" (use --data {to})" if args.to else ""))
    return 0
