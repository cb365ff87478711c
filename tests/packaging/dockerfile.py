"""Just enough of a Dockerfile reader to check what an image would contain.

Docker itself is not available to the tests, so the packaging tests read the
instructions (COPY, ENV, WORKDIR, ENTRYPOINT, ARG) and rebuild the part of the image
filesystem that comes from the repository in a temporary directory.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = ["Copy", "Dockerfile", "dockerignore_patterns", "is_ignored", "parse_dockerfile"]

_VAR_RE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


@dataclass(frozen=True)
class Copy:
    """One `COPY src... dest` from the build context (not `--from=` another stage)."""

    sources: tuple[str, ...]
    dest: str  # absolute, WORKDIR applied


@dataclass
class Dockerfile:
    path: Path
    base_images: list[str] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    user: str | None = None
    run: list[str] = field(default_factory=list)

    def image_paths(self) -> dict[str, str]:
        """Image path -> repository path for every copied file or directory."""
        paths = {}
        for copy in self.copies:
            for src in copy.sources:
                into_dir = copy.dest.endswith("/") or len(copy.sources) > 1
                dest = (
                    str(PurePosixPath(copy.dest) / PurePosixPath(src).name)
                    if into_dir
                    else copy.dest
                )
                paths[dest] = src
        return paths

    def pip_installed_projects(self) -> list[str]:
        """Repository paths the image installs as projects: `pip install <dir>` of a
        directory it COPYed (requirement and constraint files are not projects)."""
        copied = {dest.rstrip("/"): src for dest, src in self.image_paths().items()}
        projects = []
        for run in self.run:
            for words in _commands(run):
                if words[:2] != ["pip", "install"]:
                    continue
                skip_next = False
                for word in words[2:]:
                    if skip_next:
                        skip_next = False
                    elif word in ("-r", "-c", "--requirement", "--constraint"):
                        skip_next = True
                    elif not word.startswith("-") and word.rstrip("/") in copied:
                        projects.append(copied[word.rstrip("/")])
        return projects

    def materialize(self, context: Path, root: Path) -> None:
        """Copy what the COPY instructions take from `context` to the same paths under `root`."""
        for dest, src in self.image_paths().items():
            source = context / src
            target = root / dest.lstrip("/")
            if source.is_dir():
                # COPY of a directory copies its contents; bytecode is .dockerignore'd.
                shutil.copytree(
                    source,
                    target,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def _commands(shell: str) -> list[list[str]]:
    """The words of each simple command in a shell line (split at &&, ||, ; and |)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current.strip():
        lines.append(current)
    return lines


def _expand(value: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2) or ""
        return variables.get(name, default)

    return _VAR_RE.sub(sub, value)


def _exec_form(arg: str) -> list[str]:
    if arg.startswith("["):
        parsed = json.loads(arg)
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise ValueError(f"exec form must be a JSON list of strings: {arg}")
        return parsed
    return ["/bin/sh", "-c", arg]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Parse the instructions the packaging tests care about (single-stage images)."""
    result = Dockerfile(path=path)
    variables: dict[str, str] = {}
    workdir = "/"
    for line in _logical_lines(path.read_text()):
        instruction, _, arg = line.partition(" ")
        instruction = instruction.upper()
        arg = arg.strip()
        if instruction == "ARG":
            name, _, default = arg.partition("=")
            variables.setdefault(name, default)
        elif instruction == "FROM":
            result.base_images.append(_expand(arg.split()[0], variables))
        elif instruction == "ENV":
            for item in shlex.split(arg):
                name, _, value = item.partition("=")
                result.env[name] = _expand(value, {**variables, **result.env})
                variables[name] = result.env[name]
        elif instruction == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / _expand(arg, variables))
        elif instruction in ("COPY", "ADD"):
            parts = shlex.split(arg)
            if any(p.startswith("--from") for p in parts):
                continue
            parts = [_expand(p, variables) for p in parts if not p.startswith("--")]
            *sources, dest = parts
            absolute = dest if dest.startswith("/") else str(PurePosixPath(workdir) / dest)
            if dest.endswith("/") and not absolute.endswith("/"):
                absolute += "/"
            result.copies.append(Copy(sources=tuple(sources), dest=absolute))
        elif instruction == "ENTRYPOINT":
            result.entrypoint = _exec_form(arg)
        elif instruction == "USER":
            result.user = _expand(arg, variables)
        elif instruction == "RUN":
            result.run.append(_expand(arg, variables))
    return result


def dockerignore_patterns(context: Path) -> list[str]:
    ignore = context / ".dockerignore"
    if not ignore.exists():
        return []
    return [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def is_ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes.

    A pattern also matches everything below a matching directory.
    """
    ignored = False
    parts = PurePosixPath(relpath).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored
