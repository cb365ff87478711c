"""The control-plane binaries: which versions, where they live, how they are built.

Everything is built from Go modules with the machine's Go toolchain (no release
downloads: the only sources are the Go module proxy and PyPI):

* etcd, kube-apiserver, kube-controller-manager and kube-scheduler from
  `k8s.io/kubernetes` (and the etcd server it pins), through `gomod/kube/go.mod`,
  which replaces each `k8s.io/*` staging module with its release, as projects that
  import k8s.io/kubernetes do;
* the Kueue manager from `sigs.k8s.io/kueue` through `gomod/kueue/go.mod`; its CRDs
  and manifests come from the same module's source in the module cache;
* `kstatus`, a test helper (`gomod/kstatus/main.go`) that runs the kstatus library of
  `sigs.k8s.io/cli-utils` (what Flux's health checks use) on objects read from stdin;
* CoreDNS, the cluster DNS, from `github.com/coredns/coredns` through
  `gomod/coredns/main.go`, a build with only the plugins cluster DNS needs
  (kubernetes, errors, log, health, ready) instead of every cloud provider's.

Binaries go to `.tools/<component>-<version>/`, so a version bump builds afresh and
a second run is a no-op. `python -m devcluster.binaries` builds what is missing and
shows progress (the first run compiles about 3,000 packages: 15-25 minutes on two
cores; Go's build cache makes a rebuild after a version bump much faster).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO_ROOT / ".tools"
GOMOD_DIR = Path(__file__).resolve().parent / "gomod"

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.5"
KUEUE_VERSION = "v0.17.0"
CLI_UTILS_VERSION = "v0.37.2"  # gomod/kstatus/go.mod requires this version
COREDNS_VERSION = "v1.15.0"  # gomod/coredns/go.mod requires this version


def _kubernetes_version_flags(version: str) -> tuple[str, ...]:
    """What Kubernetes' own build (hack/lib/version.sh) stamps into its binaries; a
    module build otherwise reports v0.0.0-master to every client."""
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={version}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return tuple(flags)


@dataclass(frozen=True)
class Binary:
    name: str
    package: str  # the Go main package
    module_dir: str  # which gomod/ module builds it
    version: str
    version_flags: tuple[str, ...] = ()  # -X linker flags that stamp the version

    @property
    def path(self) -> Path:
        return TOOLS_DIR / f"{self.module_dir}-{self.version}" / self.name


_K8S_FLAGS = _kubernetes_version_flags(KUBERNETES_VERSION)
# etcd's version is a constant in its source; the module version pins it.
ETCD = Binary("etcd", "go.etcd.io/etcd/server/v3", "kube", KUBERNETES_VERSION)
KUBE_APISERVER = Binary(
    "kube-apiserver",
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube",
    KUBERNETES_VERSION,
    _K8S_FLAGS,
)
KUBE_CONTROLLER_MANAGER = Binary(
    "kube-controller-manager",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube",
    KUBERNETES_VERSION,
    _K8S_FLAGS,
)
KUBE_SCHEDULER = Binary(
    "kube-scheduler",
    "k8s.io/kubernetes/cmd/kube-scheduler",
    "kube",
    KUBERNETES_VERSION,
    _K8S_FLAGS,
)
KUEUE = Binary(
    "kueue",
    "sigs.k8s.io/kueue/cmd/kueue",
    "kueue",
    KUEUE_VERSION,
    (f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}",),
)

# Named for the cli-utils version it links: a bump of gomod/kstatus builds afresh.
KSTATUS = Binary("kstatus", "loraops.dev/devcluster/kstatus", "kstatus", CLI_UTILS_VERSION)

CONTROL_PLANE = (ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER)
# CoreDNS's version is a constant in its source (coremain.CoreVersion).
COREDNS = Binary("coredns", "loraops.dev/devcluster/coredns", "coredns", COREDNS_VERSION)

ALL = (*CONTROL_PLANE, KUEUE, KSTATUS, COREDNS)


class MissingBinaryError(RuntimeError):
    """A control-plane binary has not been built yet."""


def require(binary: Binary) -> Path:
    """The binary's path; a clear error naming the build command when it is absent."""
    if not binary.path.is_file():
        raise MissingBinaryError(
            f"{binary.name} {binary.version} is not built ({binary.path} is missing); "
            "run `make cluster-tools` (the first build takes 15-25 minutes)"
        )
    return binary.path


def _go() -> str:
    found = shutil.which("go")
    if found is None:
        raise MissingBinaryError("the Go toolchain (`go`, 1.25 or newer) is needed to build")
    return found


def kueue_source() -> Path:
    """The Kueue module's source in Go's module cache (CRDs, kustomize bases)."""
    out = subprocess.run(
        [_go(), "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kueue"],
        cwd=GOMOD_DIR / "kueue",
        capture_output=True,
        text=True,
        check=False,
    )
    directory = out.stdout.strip()
    if out.returncode != 0 or not directory:
        subprocess.run(
            [_go(), "mod", "download", "sigs.k8s.io/kueue"], cwd=GOMOD_DIR / "kueue", check=True
        )
        directory = subprocess.run(
            [_go(), "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kueue"],
            cwd=GOMOD_DIR / "kueue",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return Path(directory)


def build(binary: Binary, *, out: TextIO | None = None) -> float:
    """Compile one binary (go build -v); reports compiled packages as it goes.
    Returns the seconds it took."""
    stream = out or sys.stderr
    target = binary.path
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    started = time.monotonic()
    process = subprocess.Popen(
        [
            _go(),
            "build",
            "-v",
            "-trimpath",
            "-ldflags=" + " ".join(("-s", "-w", *binary.version_flags)),
            "-o",
            str(partial),
            binary.package,
        ],
        cwd=GOMOD_DIR / binary.module_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    compiled = 0
    errors: list[str] = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(15):
            print(
                f"  ... {binary.name}: {compiled} packages compiled, "
                f"{time.monotonic() - started:.0f}s",
                file=stream,
                flush=True,
            )

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        for line in process.stderr:
            # `go build -v` names each package as it compiles it; anything else is an error.
            if line.startswith(("#", " ", "\t")) or ":" in line:
                errors.append(line.rstrip())
            else:
                compiled += 1
        code = process.wait()
    finally:
        stop.set()
    if code != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building {binary.name} failed:\n" + "\n".join(errors[-40:]))
    partial.replace(target)
    return time.monotonic() - started


def ensure(binaries: tuple[Binary, ...] = ALL, *, out: TextIO | None = None) -> None:
    """Build whichever of `binaries` is missing, saying what and how long."""
    stream = out or sys.stderr
    missing = [b for b in binaries if not b.path.is_file()]
    if not missing:
        return
    print(
        f"Building {len(missing)} control-plane binaries from their Go modules "
        f"({', '.join(b.name for b in missing)}) into {TOOLS_DIR}/. The first build "
        "takes 15-25 minutes on two cores; later runs reuse them.",
        file=stream,
        flush=True,
    )
    total = time.monotonic()
    for index, binary in enumerate(missing, 1):
        print(
            f"[{index}/{len(missing)}] {binary.name} ({binary.package})",
            file=stream,
            flush=True,
        )
        seconds = build(binary, out=stream)
        print(f"  built {binary.path} in {seconds:.0f}s", file=stream, flush=True)
    print(f"Control-plane binaries ready in {time.monotonic() - total:.0f}s.", file=stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is missing")
    args = parser.parse_args()
    if args.check:
        missing = [b.name for b in ALL if not b.path.is_file()]
        print("missing: " + ", ".join(missing) if missing else "all built")
        sys.exit(1 if missing else 0)
    ensure()


if __name__ == "__main__":
    main()
