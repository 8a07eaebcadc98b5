"""Images load into a real (private) containerd with its stock overlayfs
snapshotter: `ctr image import` of both kinds of archive names the image after
--name; the --layered image runs with runc, imported or pulled from the real
registry. (Nix images running through the lazystore snapshotter are tested end
to end in test_e2e_containers.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lazystore.image.build import BuildResult, build_image
from lazystore.image.oci import RuntimeConfig
from lazystore.image.push import push_image
from lazystore.testing import containerd, registry

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not containerd.have_containerd(), reason="needs root, containerd, runc"),
]


@pytest.fixture(scope="module")
def ctd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[containerd.Containerd]:
    with containerd.Containerd(tmp_path_factory.mktemp("containerd")) as running:
        yield running


@pytest.fixture(scope="module")
def images(
    tmp_path_factory: pytest.TempPathFactory, sample_closure: str
) -> dict[str, BuildResult]:
    tmp = tmp_path_factory.mktemp("images")
    runtime = RuntimeConfig([f"{sample_closure}/bin/prog"])
    return {
        "nix": build_image([sample_closure], tmp / "nix.tar", "lazystore/nix:1", runtime),
        "layered": build_image(
            [sample_closure], tmp / "layered.tar", "lazystore/layered:1", runtime, 2
        ),
    }


def _image_digests(ctd: containerd.Containerd) -> dict[str, str]:
    out = ctd.ctr("images", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out}


@pytest.mark.parametrize("kind", ["nix", "layered"])
def test_ctr_import_names_the_image(
    ctd: containerd.Containerd, images: dict[str, BuildResult], kind: str
) -> None:
    image = images[kind]
    ctd.ctr("images", "import", str(image.path))
    assert _image_digests(ctd)[f"docker.io/lazystore/{kind}:1"] == image.manifest_digest


def test_imported_layered_image_runs_on_stock_containerd(
    ctd: containerd.Containerd, images: dict[str, BuildResult]
) -> None:
    ctd.ctr("images", "import", str(images["layered"].path))
    out = ctd.ctr("run", "--rm", "docker.io/lazystore/layered:1", "image-test-import")
    assert out.stdout == "hello from liba\n"


@pytest.mark.skipif(not registry.available(), reason="docker-registry/skopeo not installed")
def test_pushed_layered_image_pulls_and_runs(
    tmp_path: Path, ctd: containerd.Containerd, images: dict[str, BuildResult]
) -> None:
    with registry.running(tmp_path / "registry") as reg:
        ref = f"{reg.host}/lazystore/layered:pushed"
        push_image(images["layered"].path, ref, plain_http=True)
        ctd.ctr("images", "pull", "--plain-http", ref)
    assert _image_digests(ctd)[ref] == images["layered"].manifest_digest
    out = ctd.ctr("run", "--rm", ref, "image-test-pull")
    assert out.stdout == "hello from liba\n"
