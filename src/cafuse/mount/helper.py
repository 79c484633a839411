"""``mount.fuse.cafuse``: what mount(8) and fstab run, turned into ``cafuse mount``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..cli import main as cafuse_main


def main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.cafuse SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``, as mount(8)
    and fstab call it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    foreground = False
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.append(next(it, ""))
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg == "-t":
            next(it, None)
        elif arg == "-f":
            foreground = True
        elif arg in ("-n", "-s", "-v", "-r", "-w") or arg.startswith("--"):
            continue
        else:
            positional.append(arg)
    if len(positional) != 2:
        print(
            "mount.fuse.cafuse: usage: mount.fuse.cafuse INDEX MOUNTPOINT -o store=STORE",
            file=sys.stderr,
        )
        return 2
    cmd = ["mount", *positional]
    for spec in options:
        # mount(8) passes "rw" unless told "ro"; the mount is read-only either way
        kept = ",".join(item for item in spec.split(",") if item.strip() != "rw")
        if kept:
            cmd += ["-o", kept]
    if foreground:
        cmd.append("-f")
    return cafuse_main(cmd)
