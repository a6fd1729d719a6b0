"""`akvvm check <file>`: validate settings and print the effective plan; `akvvm service`: the
service process (delegated to `handler.service_main`). `check` touches nothing on disk.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from akvvm_ext.errors import AkvvmError, SettingsError
from akvvm_ext.settings import parse, plan

EXIT_INVALID = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `akvvm` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["service"]:
        from handler import service_main  # the service's own composition root, loaded on demand

        return service_main.main(args[1:])
    options = _parser().parse_args(args)
    return check(options.file, options.lib_dir, sys.stdout, sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="akvvm", description="Key Vault VM extension for Linux.")
    commands = parser.add_subparsers(dest="command", required=True)
    checker = commands.add_parser(
        "check", help="validate a settings file and print the effective plan (changes nothing)",
        description="Validate a waagent N.settings file or the bare settings object given to "
                    "`az vm extension set --settings`. Exit 0 with the plan as JSON on stdout, "
                    "or exit 2 with one line per problem on stderr.")
    checker.add_argument("file", help="the settings file")
    checker.add_argument("--lib-dir", help="where <THUMBPRINT>.crt/.prv live (default: the "
                         "parent of the extension dir holding config/)")
    commands.add_parser("service", help="run akvvm_service (started by the extension itself)")
    return parser


def check(path: str, lib_dir: str | None, out: TextIO, err: TextIO) -> int:
    """Validate `path`; print the plan to `out` (0) or every problem to `err` (2)."""
    from handler import settings_file  # with openssl/CMS decryption: `service` never needs it

    try:
        loaded = settings_file.load(path, lib_dir)
        settings = parse(loaded.raw)
    except SettingsError as error:
        err.writelines(f"{problem}\n" for problem in error.problems)
        return EXIT_INVALID
    except AkvvmError as error:
        err.write(f"{path}: {error}\n")
        return EXIT_INVALID
    shown = plan(settings)
    shown["notes"] = [*loaded.notes, *shown["notes"]]
    out.write(json.dumps(shown, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
