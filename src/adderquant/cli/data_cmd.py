"""``adderquant data fetch``: download, verify and unpack a dataset."""

from __future__ import annotations

import argparse

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
    f.add_argument("--to", required=True, metavar="DIR", help="folder to put the dataset in")
    f.add_argument(
        "--url", default=None,
        help="mirror: the archive's URL (CIFAR) or the folder URL holding the four .gz files "
        "(Fashion-MNIST); the official md5s still apply",
    )
    f.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    f.set_defaults(func=run_fetch, output_dirs={"to": ()})


def run_fetch(args: argparse.Namespace) -> int:
    folder = fetch(args.name, args.to, url=args.url, progress=not args.no_progress)
    print(f"{args.name} ready in {folder} (use --data {args.to})")
    return 0
