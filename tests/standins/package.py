"""Extension packages as Azure publishes them: a folder zipped, HandlerManifest.json at the top.

TESTPKG is the stand-ins' trivial test extension: each lifecycle command appends
`<op> <version> seq=<n> from=... at=<epoch>` to `<logFolder>/ops.log`; publicSettings.mode picks
the status enable writes (success, error, silent, slow).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

TESTPKG = Path(__file__).resolve().parent / "testpkg"


def zip_folder(folder: Path, path: Path) -> Path:
    """Write every file under `folder` to the zip `path` (paths relative, modes kept)."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder).as_posix())
    return path


def zip_testpkg(path: Path) -> Path:
    """The test extension (tests/standins/testpkg) zipped to `path`."""
    return zip_folder(TESTPKG, path)
