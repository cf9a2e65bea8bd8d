"""Over-the-air heads against a real Mosquitto and the real recorder program.

A recorder rejects unsigned, altered, foreign, damaged and replayed heads and keeps
scoring with the head it has. It applies good heads and signed rollbacks, and it
restarts on a complete head after a kill."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dawnchorus.edge.audio import FileSource
from dawnchorus.edge.ota import HeadStore
from dawnchorus.edge.recorder import Recorder, RecorderConfig
from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol import topics
from dawnchorus.protocol.messages import Manifest
from dawnchorus.protocol.signing import load_private_key, load_public_key, sign_manifest

SITE = "ota-site"
DEVICE = "rec-ota"
SITE_LABELS = [
    "Turdus merula_Eurasian Blackbird", "Erithacus rubecula_European Robin",
    "Fringilla coelebs_Common Chaffinch", "Phylloscopus collybita_Common Chiffchaff",
]


@pytest.fixture(scope="module")
def source():
    return load_source_model()


@pytest.fixture(scope="module")
def heads(source) -> dict[str, tuple[list[str], bytes]]:
    """The site's head over SITE_LABELS, and a head over three of them (another class list)."""
    site_head = source.head.select(SITE_LABELS)
    other_head = source.head.select(SITE_LABELS[:3])
    return {
        "site": (site_head.labels, head_to_tflite(site_head, "fp16")),
        "other": (other_head.labels, head_to_tflite(other_head, "fp16")),
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys") / "keys"
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory


def _manifest(labels: list[str], blob: bytes, version: int, sequence: int, **changes) -> Manifest:
    probe = np.random.default_rng(0).random((4, 1024), dtype=np.float32).astype(np.float16).astype(np.float32)
    manifest = Manifest(
        site=SITE, version=version, parent=version - 1, labels=labels,
        sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), precision="fp16",
        blob_topic=topics.blob_topic(SITE, version), created=time.time(), probe_embeddings=probe,
        probe_logits=TFLiteHead(blob, labels, version).logits(probe), sequence=sequence,
    )
    return dataclasses.replace(manifest, **changes)


@pytest.mark.slow
def test_recorder_rejects_bad_heads_keeps_running(programs, observer, mosquitto, keys, heads, data_dir, tmp_path):
    labels, blob = heads["site"]
    other_labels, other_blob = heads["other"]
    private_key = load_private_key(keys / "head-signing.key")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(SITE_LABELS) + "\n")
    # 10x real time over 16 min of audio: the recorder is busy for the whole test.
    recorder = programs.start(
        "edge", "run", "--device", DEVICE, "--site", SITE, "--broker", mosquitto.address,
        "--input", str(data_dir / "soundscapes/maad-24h"), "--speed", "10", "--species-file", str(species),
        "--head-public-key", str(keys / "head-signing.pub"), "--state-dir", str(tmp_path / "edge"),
        "--threads", "1", "--min-conf", "0.5", log="recorder.log",
    )
    assert observer.wait_online(DEVICE), programs.log("recorder.log")[-3000:]

    def signed(version: int, sequence: int, **changes) -> Manifest:
        return sign_manifest(_manifest(labels, blob, version, sequence, **changes), private_key)

    def push(manifest: Manifest, payload: bytes = blob):
        return observer.push(manifest.encode(), manifest.blob_topic, payload, SITE, DEVICE)

    first = signed(1, 1)
    applied = push(first)
    assert applied.accepted, applied.reason
    assert applied.version == 1

    altered = json.loads(signed(2, 2).encode())
    altered["version"] = 3
    altered["blob_topic"] = topics.blob_topic(SITE, 3)
    bad_probe = signed(2, 2, probe_logits=first.probe_logits + 1.0)
    rejected = {
        "unsigned": push(_manifest(labels, blob, 2, 2)),
        "other key": push(sign_manifest(_manifest(labels, blob, 2, 2), Ed25519PrivateKey.generate())),
        "altered": observer.push(json.dumps(altered).encode(), altered["blob_topic"], blob, SITE, DEVICE),
        "wrong sha256": push(signed(2, 2, sha256="0" * 64)),
        "truncated": push(signed(2, 2), blob[: len(blob) // 2]),
        "other site": push(signed(2, 2, site="elsewhere")),
        "other class list": push(sign_manifest(_manifest(other_labels, other_blob, 2, 2), private_key),
                                 other_blob),
        "probe mismatch": push(bad_probe),
    }
    expected_reasons = {
        "unsigned": "not signed", "other key": "names signing key", "altered": "changed after it was signed",
        "wrong sha256": "sha256", "truncated": "truncated", "other site": "site 'elsewhere'",
        "other class list": "another class list", "probe mismatch": "probe",
    }
    for case, ack in rejected.items():
        assert not ack.accepted, case
        assert expected_reasons[case] in ack.reason, (case, ack.reason)

    messages = len(observer.embedding_versions.get(DEVICE, []))
    assert observer.wait_for(lambda: len(observer.embedding_versions.get(DEVICE, [])) >= messages + 2, 60), \
        "recorder stopped sending embeddings after the rejections"
    assert observer.embedding_versions[DEVICE][-1] == 1
    assert recorder.poll() is None

    newer = signed(3, 3)
    applied = push(newer)
    assert applied.accepted, applied.reason
    assert applied.version == 3

    older = push(signed(2, 4))
    same = push(signed(3, 5))
    replayed = push(first)
    assert not older.accepted
    assert "version 2 is not newer than the running version 3" in older.reason
    assert not same.accepted
    assert "version 3 is not newer than the running version 3" in same.reason
    assert not replayed.accepted
    assert "sequence number 1 is not newer than 3" in replayed.reason
    assert "(replay)" in replayed.reason

    rollback = signed(1, 6, rollback=True)
    rolled_back = push(rollback)
    assert rolled_back.accepted, rolled_back.reason
    assert rolled_back.version == 1

    replayed_head = push(newer)
    assert not replayed_head.accepted
    assert "sequence number 3 is not newer than 6" in replayed_head.reason

    latest = push(signed(4, 7))
    assert latest.accepted, latest.reason
    assert latest.version == 4

    replayed_rollback = push(rollback)
    assert not replayed_rollback.accepted
    assert "sequence number 6 is not newer than 7" in replayed_rollback.reason
    assert recorder.poll() is None

    index = json.loads((tmp_path / "edge" / DEVICE / "heads" / "installed.json").read_text())
    assert index["last_sequence"] == 7
    log = programs.log("recorder.log")
    assert "rollback to head v1 verified" in log
    assert "keeps running v4" in log


def _recorder(config: RecorderConfig, source, data_dir) -> Recorder:
    return Recorder(config, Backbone(source.backbone, num_threads=1), source.head,
                    FileSource([data_dir / "soundscapes/opensoundscape/birds_10s.wav"]))


def test_restart_resumes_previous_if_current_damaged(source, heads, keys, tmp_path, data_dir):
    labels, blob = heads["site"]
    private_key = load_private_key(keys / "head-signing.key")
    store_dir = tmp_path / DEVICE / "heads"
    store = HeadStore(store_dir)
    store.install(sign_manifest(_manifest(labels, blob, 2, 2), private_key), blob)
    store.install(sign_manifest(_manifest(labels, blob, 3, 3), private_key), blob)
    index = json.loads((store_dir / "installed.json").read_text())
    (store_dir / f"{index['current']}.tflite").write_bytes(blob[:100])

    config = RecorderConfig(device=DEVICE, site=SITE, state_dir=tmp_path,
                            head_public_key=load_public_key(keys / "head-signing.pub"), head_labels=labels)
    assert _recorder(config, source, data_dir).head_version == 2


def test_restart_ignores_heads_of_other_key(source, heads, keys, tmp_path, data_dir):
    labels, blob = heads["site"]
    store = HeadStore(tmp_path / DEVICE / "heads")
    store.install(sign_manifest(_manifest(labels, blob, 2, 2), Ed25519PrivateKey.generate()), blob)

    other_key = RecorderConfig(device=DEVICE, site=SITE, state_dir=tmp_path,
                               head_public_key=load_public_key(keys / "head-signing.pub"))
    no_key = RecorderConfig(device=DEVICE, site=SITE, state_dir=tmp_path)
    assert _recorder(other_key, source, data_dir).head_version == 0
    assert _recorder(no_key, source, data_dir).head_version == 0


def test_restart_ignores_heads_of_other_class_list(source, heads, keys, tmp_path, data_dir):
    labels, blob = heads["site"]
    store = HeadStore(tmp_path / DEVICE / "heads")
    store.install(sign_manifest(_manifest(labels, blob, 2, 2), load_private_key(keys / "head-signing.key")), blob)

    config = RecorderConfig(device=DEVICE, site=SITE, state_dir=tmp_path,
                            head_public_key=load_public_key(keys / "head-signing.pub"), head_labels=labels[:3])
    assert _recorder(config, source, data_dir).head_version == 0


# Installs a head in a child process and sends it SIGKILL just before its N-th
# file operation inside the store (open, rename or remove), counted by an audit
# hook. With N = 0 it installs without a kill and prints the number of operations.
_KILLED_INSTALL = textwrap.dedent("""
    import os, pathlib, signal, sys
    from dawnchorus.edge.ota import HeadStore
    from dawnchorus.protocol.messages import Manifest

    directory, manifest_path, blob_path, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    manifest = Manifest.decode(pathlib.Path(manifest_path).read_bytes())
    blob = pathlib.Path(blob_path).read_bytes()
    store = HeadStore(pathlib.Path(directory))
    operations = 0

    def kill_before_operation(event, args):
        global operations
        if event in ("open", "os.rename", "os.remove") and str(args[0]).startswith(directory):
            operations += 1
            if operations == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_before_operation)
    store.install(manifest, blob)
    print(operations)
""")


def test_install_killed_at_every_step_leaves_complete_head(heads, keys, tmp_path):
    labels, blob = heads["site"]
    private_key = load_private_key(keys / "head-signing.key")
    public_key = load_public_key(keys / "head-signing.pub")
    oldest = sign_manifest(_manifest(labels, blob, 1, 1), private_key)
    old = sign_manifest(_manifest(labels, blob, 2, 2), private_key)
    new = sign_manifest(_manifest(labels, blob, 3, 3), private_key)
    (tmp_path / "new.json").write_bytes(new.encode())
    (tmp_path / "new.tflite").write_bytes(blob)

    def install_new(directory, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _KILLED_INSTALL, str(directory), str(tmp_path / "new.json"),
             str(tmp_path / "new.tflite"), str(kill_at)],
            capture_output=True, text=True, timeout=120,
        )

    def store_with_old(name: str):
        # With two heads installed, the new install also removes the oldest one's files.
        directory = tmp_path / name
        store = HeadStore(directory)
        store.install(oldest, blob)
        store.install(old, blob)
        return directory

    dry_run = install_new(store_with_old("complete"), kill_at=0)
    assert dry_run.returncode == 0, dry_run.stderr
    operations = int(dry_run.stdout)
    assert operations >= 8

    restored = {}
    for kill_at in range(1, operations + 1):
        directory = store_with_old(f"killed-{kill_at}")
        killed = install_new(directory, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)

        head = HeadStore(directory).load_last_good(SITE, public_key, labels)
        assert head is not None, f"no complete head after a kill before operation {kill_at}"
        restored[kill_at] = head.manifest.version
        assert not [path.name for path in directory.iterdir() if path.name.endswith(".partial")], kill_at

    assert set(restored.values()) == {2, 3}, restored
    assert restored[1] == 2
    assert restored[operations] == 3
    versions = list(restored.values())
    assert versions == sorted(versions), f"a later kill restored an older head: {restored}"
