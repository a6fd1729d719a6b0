"""Builds `dist/KeyVaultForLinux-<version>.zip`, the package the guest agent downloads.

Contents: HandlerManifest.json, bin/, handler/, akvvm_ext/ and the runtime dependencies as
unpacked wheels under vendor/, for CPython 3.10-3.13 on x86_64 and aarch64 glibc:
  vendor/any/            wheels every target uses (pure python, same version everywhere)
  vendor/<machine>/      wheels every version on that machine uses (abi3: cryptography)
  vendor/cp3XX-<machine>/ the rest (per-version binaries: cffi, msgpack, rpds-py, ...)
bin/_python puts all three on PYTHONPATH for the interpreter it finds. pylibacl ships no wheels:
the engine falls back to `setfacl`. Wheels are downloaded once per target into
build/vendor/<requirements digest>/ (pip download --only-binary=:all:), so later builds are offline.
The zip is deterministic: sorted entries, 1980-01-01 timestamps, fixed modes, no symlinks,
no tests, no caches.
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
MACHINES = ("x86_64", "aarch64")
NO_WHEELS = ("pylibacl",)  # no manylinux wheels: the engine uses setfacl instead
GLIBC = (5, 12, 17, 24, 26, 27, 28, 31, 34, 35)  # manylinux_2_<n> accepted; Ubuntu 22.04: 2.35
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
PACKAGES = ("handler", "akvvm_ext")
TOP_FILES = ("HandlerManifest.json",)
SKIP_PARTS = ("__pycache__", "tests")
SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp")


@dataclass(frozen=True)
class Target:
    """One interpreter the zip supports: `cp311-x86_64`."""

    python: str
    machine: str

    @property
    def tag(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}"


def all_targets() -> list[Target]:
    return [Target(p, m) for m in MACHINES for p in PYTHONS]


def requirements() -> list[str]:
    """setup.cfg's install_requires without NO_WHEELS, pinned to the versions installed here."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    pinned = []
    for line in parser["options"]["install_requires"].split("\n"):
        spec = line.strip()
        name = re.split(r"[<>=!~;\s\[]", spec, maxsplit=1)[0]
        if not spec or name in NO_WHEELS:
            continue
        try:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(spec)
    return sorted(pinned)


def pip_download(target: Target, reqs: list[str], dest: str) -> bool:
    """Fetch the target's wheels into `dest` once; a finished download is marked by `.done`."""
    if os.path.exists(os.path.join(dest, ".done")):
        return True
    os.makedirs(dest, exist_ok=True)
    abi = f"cp{target.python.replace('.', '')}"
    platforms = [f"manylinux_2_{n}_{target.machine}" for n in GLIBC]
    platforms += [f"manylinux{alias}_{target.machine}" for alias in ("1", "2010", "2014")]
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--dest", dest, "--python-version", target.python,
            "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for platform in platforms:
        argv += ["--platform", platform]
    done = subprocess.run([*argv, *reqs], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"make_zip: no complete wheel set for {target.tag}, skipped:\n"
              f"{done.stderr.strip()[-800:]}", file=sys.stderr)
        return False
    with open(os.path.join(dest, ".done"), "w") as handle:
        handle.write("\n".join(reqs) + "\n")
    return True


def wheels_by_target(cache: str, targets: list[Target], reqs: list[str]) -> dict[Target, list[str]]:
    """Target -> paths of its wheels, abi3 ones shared per machine (see `share_abi3`)."""
    found = {}
    for target in targets:
        dest = os.path.join(cache, target.tag)
        if pip_download(target, reqs, dest):
            found[target] = sorted(os.path.join(dest, f) for f in os.listdir(dest)
                                   if f.endswith(".whl"))
    return share_abi3(found)


def share_abi3(found: dict[Target, list[str]]) -> dict[Target, list[str]]:
    """pip picks cp311-abi3 for 3.11+ and cp39-abi3 for 3.10; the older one serves every version
    on its machine, so use it everywhere (one copy of cryptography per machine, not four)."""
    oldest: dict[tuple[str, str], str] = {}
    for target in sorted(found, key=lambda t: version_key(t.python)):
        for path in found[target]:
            if "-abi3-" in os.path.basename(path):
                oldest.setdefault((target.machine, _project(path)), path)
    return {target: sorted(oldest.get((target.machine, _project(p)), p) for p in paths)
            for target, paths in found.items()}


def _project(path: str) -> str:
    return os.path.basename(path).split("-", 1)[0].lower()


def version_key(python: str) -> tuple[int, ...]:
    return tuple(int(part) for part in python.split("."))


def placement(found: dict[Target, list[str]]) -> dict[str, list[str]]:
    """vendor subdir -> wheel names: each wheel in the most shared dir all its users read."""
    users: dict[str, set[Target]] = {}
    for target, wheels in found.items():
        for wheel in wheels:
            users.setdefault(os.path.basename(wheel), set()).add(target)
    everyone = set(found)
    layout: dict[str, list[str]] = {}
    for wheel, targets in sorted(users.items()):
        machines = {t.machine for t in targets}
        same_machine = {t for t in everyone if t.machine in machines}
        if targets == everyone:
            dirs = ["any"]
        elif len(machines) == 1 and targets == same_machine:
            dirs = [machines.pop()]
        else:
            dirs = sorted(t.tag for t in targets)
        for subdir in dirs:
            layout.setdefault(subdir, []).append(wheel)
    return layout


def wheel_members(path: str) -> Iterator[tuple[str, bytes, bool]]:
    """(name, data, executable) of a wheel's importable files."""
    with zipfile.ZipFile(path) as wheel:
        for info in sorted(wheel.infolist(), key=lambda i: i.filename):
            name = info.filename
            top = name.split("/", 1)[0]
            if info.is_dir() or top.endswith(".data") or _skipped(name):
                continue
            yield name, wheel.read(info), name.endswith(".so")


def vendor_entries(found: dict[Target, list[str]]) -> dict[str, tuple[bytes, bool]]:
    entries: dict[str, tuple[bytes, bool]] = {}
    sources = {os.path.basename(path): path for paths in found.values() for path in paths}
    for subdir, wheels in placement(found).items():
        for wheel in wheels:
            for name, data, executable in wheel_members(sources[wheel]):
                entries.setdefault(f"vendor/{subdir}/{name}", (data, executable))
    return entries


def _skipped(relpath: str) -> bool:
    parts = relpath.split("/")
    return any(p in SKIP_PARTS for p in parts) or relpath.endswith(SKIP_SUFFIXES)


def source_entries(version: str) -> dict[str, tuple[bytes, bool]]:
    """The extension's own files; the version is stamped into akvvm_ext/__init__.py."""
    entries: dict[str, tuple[bytes, bool]] = {}
    for name in TOP_FILES:
        entries[name] = (_read(name), False)
    for name in sorted(os.listdir(os.path.join(ROOT, "bin"))):
        if not _skipped(name) and os.path.isfile(os.path.join(ROOT, "bin", name)):
            entries[f"bin/{name}"] = (_read(f"bin/{name}"), True)
    for relpath in _package_files():
        entries[relpath] = (_read(relpath), False)
    init = "akvvm_ext/__init__.py"
    stamped = re.sub(rb'__version__ = "[^"]*"', f'__version__ = "{version}"'.encode(),
                     entries[init][0])
    entries[init] = (stamped, False)
    return entries


def _package_files() -> Iterable[str]:
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_PARTS and not d.startswith("."))
            for name in sorted(files):
                relpath = os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
                if name.endswith((".py", ".json", ".service")) and not _skipped(relpath):
                    yield relpath


def _read(relpath: str) -> bytes:
    with open(os.path.join(ROOT, relpath), "rb") as handle:
        return handle.read()


def write_zip(path: str, entries: dict[str, tuple[bytes, bool]]) -> None:
    """Sorted entries, fixed time and modes, written to a temp file and renamed."""
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(entries):
            data, executable = entries[name]
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system = 3
            info.external_attr = (0o100755 if executable else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=1)  # 3x faster than 6, 10% larger
    os.replace(tmp, path)


def digest(reqs: list[str]) -> str:
    blob = json.dumps({"requirements": reqs, "glibc": GLIBC}).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build(version: str, out_dir: str, targets: list[Target], cache_root: str) -> str:
    """Build the zip and return its path."""
    reqs = requirements()
    cache = os.path.join(cache_root, digest(reqs))
    found = wheels_by_target(cache, targets, reqs)
    entries = {**vendor_entries(found), **source_entries(version)}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"KeyVaultForLinux-{version}.zip")
    write_zip(path, entries)
    return path


def _version() -> str:
    text = _read("akvvm_ext/__init__.py").decode()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if not match:
        raise SystemExit("make_zip: no __version__ in akvvm_ext/__init__.py")
    return match.group(1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=_version(), help="handler version (default: package)")
    parser.add_argument("--out", default=os.path.join(ROOT, "dist"), help="output directory")
    parser.add_argument("--cache", default=os.path.join(ROOT, "build", "vendor"),
                        help="wheel download cache")
    parser.add_argument("--targets", default="", help="e.g. cp311-x86_64,cp312-aarch64 (all)")
    parser.add_argument("--download-only", action="store_true",
                        help="only fill the wheel cache (a setup step, so later builds and the "
                             "tests that build need no network)")
    args = parser.parse_args(argv)
    wanted = [t for t in all_targets() if not args.targets or t.tag in args.targets.split(",")]
    started = time.monotonic()
    if args.download_only:
        reqs = requirements()
        found = wheels_by_target(os.path.join(args.cache, digest(reqs)), wanted, reqs)
        print(f"wheels cached for {len(found)} of {len(wanted)} targets")
        return 0
    path = build(args.version, args.out, wanted, args.cache)
    size = os.path.getsize(path) / 1e6
    print(f"{os.path.relpath(path)}: {size:.1f} MB in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
