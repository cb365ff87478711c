"""Writes the kubeconfig every client (kubectl, helm, kopf, the Python client) uses.

Bearer-token auth over HTTPS on 127.0.0.1 (client-go sends tokens only over TLS),
with the harness CA embedded: the API server rejects requests without the token,
which proves that a client really read this file.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import yaml

CONTEXT_NAME = "loraops-harness"


def kubeconfig_dict(
    server_url: str, token: str, ca_pem: bytes, namespace: str = "default"
) -> dict[str, Any]:
    """The kubeconfig document for one API server (pure)."""
    cluster = {
        "server": server_url,
        "certificate-authority-data": base64.b64encode(ca_pem).decode(),
    }
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT_NAME, "cluster": cluster}],
        "users": [{"name": CONTEXT_NAME, "user": {"token": token}}],
        "contexts": [
            {
                "name": CONTEXT_NAME,
                "context": {"cluster": CONTEXT_NAME, "user": CONTEXT_NAME, "namespace": namespace},
            }
        ],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }


def write_kubeconfig(
    path: Path, server_url: str, token: str, ca_pem: bytes, namespace: str = "default"
) -> Path:
    """Write the kubeconfig (mode 0600, as kubectl expects for files holding tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(kubeconfig_dict(server_url, token, ca_pem, namespace), out, sort_keys=False)
    return path
