"""names.py: Kubernetes syntax checks and name shortening."""

from __future__ import annotations

import pytest
from lorajob_operator import names


@pytest.mark.parametrize("value", ["8", "500m", "16Gi", "1.5", "64G", "1e9", ".5"])
def test_quantities_ok(value: str) -> None:
    assert names.check_quantity(value) == value


@pytest.mark.parametrize("value", ["16GB", "-1", "1 Gi", "Gi", "", "0", "0.0Gi", " 1"])
def test_quantities_bad(value: str) -> None:
    with pytest.raises(ValueError, match=r"quantity|greater than zero"):
        names.check_quantity(value)


@pytest.mark.parametrize(
    "image",
    [
        "ubuntu",
        "ghcr.io/loraops/lora-trainer:0.1.0",
        "registry.local:5000/a/b_c__d:tag-1",
        "repo@sha256:" + "0" * 64,
        "localhost/x/y:z@sha256:" + "f" * 64,
        "localhost:5000/x",
        "my-registry:5000/team/trainer:1",
    ],
)
def test_images_ok(image: str) -> None:
    assert names.check_image(image) == image


@pytest.mark.parametrize("image", ["", "UPPER/case", "a b", "a:", "a@sha256:xyz", "-a/b"])
def test_images_bad(image: str) -> None:
    with pytest.raises(ValueError, match="container image reference"):
        names.check_image(image)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("nvidia.com/gpu", True),
        ("nvidia.com/mig-1g.10gb", True),
        ("amd.com/gpu", True),
        ("gpu", False),
        ("nvidia.com/", False),
        ("a/b/c", False),
        ("kubernetes.io/cpu", False),
    ],
)
def test_extended_resource_names(value: str, ok: bool) -> None:
    if ok:
        assert names.check_extended_resource_name(value) == value
    else:
        with pytest.raises(ValueError, match=r"nvidia\.com/gpu"):
            names.check_extended_resource_name(value)


def test_label_safe() -> None:
    assert names.label_safe("llama") == "llama"
    long = names.label_safe("x" * 100)
    assert len(long) <= 63
    assert long != names.label_safe("x" * 101)
    assert names.label_safe("a/b") != "a/b"
    assert len(names.label_safe("/" * 80)) <= 63
