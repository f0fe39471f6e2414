"""``fedsim data``: fetch a dataset's files (``download``) or show where they go (``info``)."""

from __future__ import annotations

import argparse
import inspect

from fedsim.errors import UserError

EPILOG = """\
examples:
  fedsim data info cifar10
  fedsim data download mnist                   # into $FEDSIM_DATA or ~/.cache/fedsim/data
  fedsim data download cifar10 --root /data    # then: [dataset] root = "/data"

A download that breaks off resumes where it stopped when the same command runs again.
"""


def _source(name: str):
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.data import DATASETS
    from fedsim.data.sources import source_for

    if name in DATASETS and DATASETS[name].offline:
        raise UserError(f"{name!r} is embedded in an installed package and needs no download")
    return source_for(name)


def execute_download(args: argparse.Namespace) -> int:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.data.download import download
    from fedsim.data.sources import data_root

    if args.attempts < 1:
        raise UserError(f"--attempts {args.attempts} is invalid: give 1 or more tries per file (default 3)")
    if args.root is not None and not args.root.strip():
        raise UserError("--root '' names no folder; give the folder for the files, or leave --root out")
    source = _source(args.name)
    root = data_root(args.root)
    folder = download(source, root, attempts=args.attempts)
    hint = f' (in an experiment: [dataset] root = "{root}")' if args.root else ""
    print(f"{source.name}: ready in {folder}{hint}")
    return 0


def execute_info(args: argparse.Namespace) -> int:
    # lazy: a command loads what it runs, so `fedsim --help` starts at once
    from fedsim.data import DATASETS
    from fedsim.data.sources import SOURCES, data_root
    from fedsim.registry import accepted_parameters, lookup

    info = lookup(DATASETS, args.name, "dataset")
    print(f"{args.name}: {info.description}")
    print(f"  shape {'x'.join(map(str, info.shape))}, {len(info.classes)} classes: {', '.join(info.classes)}")
    if info.domains:
        print(f"  domains: {', '.join(info.domains)}")
    options = [
        name if p.default is inspect.Parameter.empty else f"{name} = {p.default!r}"
        for name, p in accepted_parameters(info.loader).items()
    ]
    print(f"  [dataset] options: {'; '.join(options) or 'none'}")
    if args.name not in SOURCES:
        print("  embedded: available offline, no files needed")
        return 0
    source = SOURCES[args.name]
    root = data_root(args.root)
    print(f"  files: {source.expected}")
    print(f"  searched in: {', '.join(str(root / folder) for folder in source.search)}")
    print(f"  from: {source.homepage}")
    if not source.resources:
        print(f"  no direct download: {source.manual}")
    for resource in source.resources:
        checksum = (
            f"sha256 {resource.sha256}" if resource.sha256 else f"md5 {resource.md5}" if resource.md5 else "no checksum"
        )
        print(f"  download: {resource.url} ({checksum})")
    for note in source.notes:
        print(f"  note: {note}")
    return 0


def _no_action(_args: argparse.Namespace) -> int:
    raise UserError("fedsim data: choose an action, download or info (see fedsim data --help)")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "data",
        help="download dataset files or show where they go",
        description="Download a dataset's files, or show what a dataset needs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    parser.set_defaults(handler=_no_action)

    download = actions.add_parser(
        "download",
        help="fetch and verify a dataset's files",
        description="Fetch a dataset's files, check their SHA-256 (or MD5) and unpack archives.",
    )
    download.add_argument("name", metavar="NAME", help="dataset name (see fedsim list)")
    download.add_argument("--root", help="folder for the files (default: $FEDSIM_DATA or ~/.cache/fedsim/data)")
    download.add_argument("--attempts", type=int, default=3, help="tries per file, each resuming the last (default 3)")
    download.set_defaults(handler=execute_download)

    info = actions.add_parser("info", help="show a dataset's options, files and sources")
    info.add_argument("name", metavar="NAME", help="dataset name (see fedsim list)")
    info.add_argument("--root", help="the root to show (default: $FEDSIM_DATA or ~/.cache/fedsim/data)")
    info.set_defaults(handler=execute_info)
