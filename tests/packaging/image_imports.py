"""Import a package the way it would be imported inside an image, in a child process.

    python image_imports.py <package> <allowed.json>

`allowed.json` holds {"roots": [dirs standing in for the image's PYTHONPATH],
"distributions": [top-level module names the image's pip install provides],
"repo": the repository root, whose source directories are taken off sys.path}.
Run it with `python -I` so neither PYTHONPATH nor the current directory leak in.
Everything else outside the standard library is made unimportable, including the
repository's own editable install, so an import that only works on a developer's
machine (torch, a test helper, a trainer module the image does not copy) fails here.

Every module of <package> is imported except `__main__` (which would start it).
Prints a JSON report: {"imported": [...], "files": {module: file}}.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


class _ImageOnly(importlib.abc.MetaPathFinder):
    """Refuse top-level imports that the image could not satisfy."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        del path, target
        top = fullname.partition(".")[0]
        if top in self.allowed or top in sys.stdlib_module_names or top in sys.modules:
            return None  # let the normal finders look (only in allowed places)
        raise ModuleNotFoundError(f"{fullname!r} is not in the image", name=fullname)


def _in_repo_sources(path: Path, repo: Path) -> bool:
    resolved = path.resolve()
    venv = repo / ".venv"
    return resolved.is_relative_to(repo) and not resolved.is_relative_to(venv)


def main(package: str, allowed_file: str) -> int:
    spec = json.loads(Path(allowed_file).read_text())
    roots = [str(Path(r).resolve()) for r in spec["roots"]]
    repo = Path(spec["repo"]).resolve()
    # The image's PYTHONPATH first, then the interpreter's own paths; the repository's
    # source directories and its editable-install finder are removed.
    sys.path[:] = roots + [p for p in sys.path if p and not _in_repo_sources(Path(p), repo)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    own = {p.name for r in roots for p in Path(r).iterdir() if p.is_dir() or p.suffix == ".py"}
    allowed = set(spec["distributions"]) | {name.removesuffix(".py") for name in own}
    sys.meta_path.insert(0, _ImageOnly(allowed))

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
    print(json.dumps({"imported": imported, "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
