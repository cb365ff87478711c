"""The container images contain what they need, and the operator image needs no torch.

Docker is not available here, so the Dockerfiles are read (see dockerfile.py) and the
repository part of each image is rebuilt in a temporary directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.packaging.dockerfile import (
    Dockerfile,
    dockerignore_patterns,
    is_ignored,
    parse_dockerfile,
)

REPO = Path(__file__).resolve().parents[2]
OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE]
# The trainer's stack: none of it may be needed by the operator image.
TRAINING_STACK = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def _requirements(path: Path) -> list[Requirement]:
    reqs = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r"):
            reqs += _requirements(path.parent / line[2:].strip())
            continue
        reqs.append(Requirement(line))
    return reqs


def _distribution_closure(reqs: list[Requirement]) -> set[str]:
    """Canonical names of the distributions `pip install <reqs>` would install."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here cannot be imported either
        for spec in requires:
            dep = Requirement(spec)
            envs = [{"extra": e} for e in ("", *extras)]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append((dep, frozenset(dep.extras)))
    return {key.partition("[")[0] for key in seen}


def _site_with_only(distributions: set[str], site: Path) -> Path:
    """A site-packages holding links to exactly these distributions' files."""
    site.mkdir(parents=True)
    for name in sorted(distributions):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}
        for top in sorted(tops):
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source, target_is_directory=source.is_dir())
    return site


def _project_packages(project: Path) -> list[str]:
    """The import packages a local project's pyproject.toml lists."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    packages: list[str] = meta["tool"]["setuptools"]["packages"]
    return packages


def _install_projects(image: Dockerfile, site: Path, closure: set[str]) -> list[str]:
    """Put the projects the image pip-installs into `site`, as pip would (their packages
    copied in); their dependencies must already be in `closure`, since the image
    installs them with --no-deps. Returns the import packages added."""
    added = []
    for src in image.pip_installed_projects():
        project = REPO / src
        meta = tomllib.loads((project / "pyproject.toml").read_text())
        for spec in meta["project"].get("dependencies", []):
            name = canonicalize_name(Requirement(spec).name)
            assert name in closure, f"{src} needs {name}, which the image does not install"
        for package in _project_packages(project):
            shutil.copytree(
                project / package, site / package, ignore=shutil.ignore_patterns("__pycache__")
            )
            added.append(package)
    return added


def _import_in_image(package: str, roots: list[Path], site: Path, tmp_path: Path) -> Any:
    paths = tmp_path / "paths.json"
    paths.write_text(json.dumps({"roots": [str(r) for r in roots], "site": str(site)}))
    script = Path(__file__).with_name("image_imports.py")
    return subprocess.run(
        [sys.executable, "-I", "-S", str(script), package, str(paths)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def operator_image() -> Dockerfile:
    return parse_dockerfile(OPERATOR_DOCKERFILE)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_copied_path_exists_and_reaches_the_build_context(dockerfile: Path) -> None:
    assert dockerfile.exists(), f"{dockerfile.relative_to(REPO)} is missing"
    image = parse_dockerfile(dockerfile)
    assert image.copies, "the image copies nothing from the repository"
    patterns = dockerignore_patterns(REPO)
    for copy in image.copies:
        for src in copy.sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path (build context = repo root)"
            assert not is_ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_image_is_pinned_and_runs_as_non_root(dockerfile: Path) -> None:
    image = parse_dockerfile(dockerfile)
    for base in image.base_images:
        tag = base.rsplit(":", 1)[-1] if ":" in base else ""
        assert re.search(r"\d+\.\d+\.\d+", tag) or "@sha256:" in base, (
            f"base image {base!r} is not pinned to a release"
        )
    # A numeric UID, so `runAsNonRoot: true` can be verified by the kubelet.
    assert image.user is not None, "no USER: the image would run as root"
    uid = image.user.split(":")[0]
    assert uid.isdigit(), f"USER {image.user!r}: use a numeric UID"
    assert int(uid) != 0, "USER 0 is root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_requirements_installed_by_the_image_are_pinned(dockerfile: Path) -> None:
    image = parse_dockerfile(dockerfile)
    in_image = image.image_paths()
    installed = [path for run in image.run for path in re.findall(r"-r\s+(\S+\.txt)", run)]
    assert installed, "the image installs no requirements file"
    for target in installed:
        sources = [src for dest, src in in_image.items() if dest.endswith(target.lstrip("./"))]
        assert sources, f"pip install -r {target}: the file is not COPYed into the image"
        requirements = REPO / sources[0]
        for req in _requirements(requirements):
            specs = list(req.specifier)
            assert len(specs) == 1, f"{requirements.name}: {req} must be pinned with =="
            assert specs[0].operator == "==", f"{requirements.name}: {req} must be pinned with =="


def test_operator_requirements_exclude_the_training_stack() -> None:
    closure = _distribution_closure(_requirements(REPO / "requirements" / "operator.txt"))
    assert not closure & {canonicalize_name(n) for n in TRAINING_STACK}


def test_operator_image_installs_the_contract_and_copies_no_trainer_module(
    operator_image: Dockerfile,
) -> None:
    """What the operator shares with the trainer comes from the loraops-contract
    distribution, never from files picked out of the trainer package."""
    sources = [src for copy in operator_image.copies for src in copy.sources]
    assert not [src for src in sources if src.startswith("trainer_image/")]
    assert operator_image.pip_installed_projects() == ["contract"]
    assert _project_packages(REPO / "contract") == ["loraops_contract"]


def test_trainer_image_installs_the_same_contract() -> None:
    assert parse_dockerfile(TRAINER_DOCKERFILE).pip_installed_projects() == ["contract"]


def test_operator_entrypoint_module_is_in_the_image(
    operator_image: Dockerfile, tmp_path: Path
) -> None:
    operator_image.materialize(REPO, tmp_path)
    entry = operator_image.entrypoint
    assert entry[:2] == ["python", "-m"], f"unexpected ENTRYPOINT {entry}"
    module = entry[2]
    roots = [tmp_path / p.lstrip("/") for p in operator_image.env["PYTHONPATH"].split(":")]
    candidates = [root / module.replace(".", "/") / "__main__.py" for root in roots] + [
        root / (module.replace(".", "/") + ".py") for root in roots
    ]
    assert any(c.exists() for c in candidates), f"`python -m {module}` has nothing to run"


def test_operator_image_imports_without_the_training_stack(
    operator_image: Dockerfile, tmp_path: Path
) -> None:
    """Import every operator module with only what the image holds.

    The child interpreter sees the files the Dockerfile COPYs, the distributions
    requirements/operator.txt installs (with their dependencies) and the standard
    library; torch, transformers, boto3, test helpers and the editable install are not
    importable.
    """
    image_root = tmp_path / "image"
    operator_image.materialize(REPO, image_root)
    roots = [image_root / p.lstrip("/") for p in operator_image.env["PYTHONPATH"].split(":")]
    closure = _distribution_closure(_requirements(REPO / "requirements" / "operator.txt"))
    site = _site_with_only(closure, tmp_path / "site-packages")
    assert _install_projects(operator_image, site, closure) == ["loraops_contract"]
    proc = _import_in_image("lorajob_operator", roots, site, tmp_path)
    assert proc.returncode == 0, f"operator import failed in the image:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "lorajob_operator.handlers" in report["imported"]
    for module, file in report["files"].items():
        assert file.startswith(str(image_root)), f"{module} was loaded from {file}, not the image"
    loaded = {m.partition(".")[0] for m in report["modules"]}
    assert "loraops_contract" in loaded  # from the installed distribution, nowhere else
    assert "lora_trainer" not in loaded
    assert not loaded & {*TRAINING_STACK, "boto3", "botocore"}


def test_import_check_fails_for_a_module_outside_the_image(tmp_path: Path) -> None:
    """The check above can fail: a package importing torch is refused."""
    root = tmp_path / "image" / "app"
    pkg = root / "needs_torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "handlers.py").write_text("import torch\n")
    site = _site_with_only({"pyyaml"}, tmp_path / "site-packages")
    proc = _import_in_image("needs_torch", [root], site, tmp_path)
    assert proc.returncode != 0
    assert "No module named 'torch'" in proc.stderr
