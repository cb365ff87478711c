"""Import a package the way it would be imported inside an image, in a child process.

    python -I -S image_imports.py <package> <paths.json>

`paths.json` holds {"roots": [dirs standing in for the image's PYTHONPATH],
"site": a directory holding exactly the packages the image's pip install provides}.
Run with `-S` (no site-packages, so neither the venv's other packages nor the
repository's editable install are visible) and `-I` (no PYTHONPATH, no current
directory): the interpreter then sees the standard library, `site` and `roots`, and
nothing else, so an import that only works on a developer machine (torch, a test
helper, a trainer module the image does not copy) fails here.

Every module of <package> is imported except `__main__` (which would start it).
Prints a JSON report: {"imported": [...], "files": {module: file}}.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path


def main(package: str, paths_file: str) -> int:
    spec = json.loads(Path(paths_file).read_text())
    roots = [str(Path(r)) for r in spec["roots"]]
    sys.path[:0] = [*roots, str(Path(spec["site"]))]
    own = {p.name.removesuffix(".py") for r in roots for p in Path(r).iterdir()}

    root_pkg = importlib.import_module(package)
    imported = [package]
    for info in pkgutil.walk_packages(root_pkg.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
    files = {
        name: str(getattr(mod, "__file__", None))
        for name, mod in sorted(sys.modules.items())
        if name.partition(".")[0] in own
    }
    print(json.dumps({"imported": imported, "files": files, "modules": sorted(sys.modules)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
