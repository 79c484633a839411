"""Mount subcommands: placeholder registration until the mount daemon lands."""

from __future__ import annotations

import argparse


def add_mount_commands(sub: argparse._SubParsersAction) -> None:
    return None
