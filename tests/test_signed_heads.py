"""Signed heads end to end, with the real programs against a real Mosquitto on real recordings.

The base station signs what it publishes, ``dawnchorus server rollback`` sends a
site back to an older head, recorders reject replays of earlier manifests, and a
recorder killed with SIGKILL in the middle of a head swap restarts on a complete head.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from support import SPECIES
from support import wait as _wait

from dawnchorus.models.backbone import load_source_model
from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol import topics
from dawnchorus.protocol.messages import Manifest
from dawnchorus.protocol.signing import load_private_key, sign_manifest



def _generate_keys(directory: pathlib.Path) -> pathlib.Path:
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory




def _published_versions(server_state: pathlib.Path, site: str) -> list[int]:
    directory = server_state / "sites" / site / "manifests"
    return sorted(int(path.stem[1:]) for path in directory.glob("v*.json")) if directory.is_dir() else []


def _last_ack(observer, device: str):
    acks = observer.acks_of(device)
    return acks[-1] if acks else None


@pytest.mark.slow
def test_rollback_applied_and_replays_rejected(programs, observer, mosquitto, data_dir, tmp_path):
    site = "rollback-site"
    keys = _generate_keys(tmp_path / "keys")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(SPECIES) + "\n")
    server_state = tmp_path / "server"
    signing = ["--signing-key", str(keys / "head-signing.key")]
    server = programs.start(
        "server", "run", "--broker", mosquitto.address, "--state-dir", str(server_state), *signing,
        "--default-species", f"@{species}", "--update-interval", "8", "--min-buffer", "8", "--buffer", "1000",
        log="server.log",
    )
    assert _wait(lambda: "base station ready" in programs.log("server.log") or server.poll() is not None, 180)
    assert server.poll() is None, programs.log("server.log")[-3000:]

    def start_recorder(device: str, recording: pathlib.Path):
        return programs.start(
            "edge", "run", "--device", device, "--site", site, "--broker", mosquitto.address,
            "--input", str(recording), "--speed", "0", "--stay", "--species-file", str(species),
            "--head-public-key", str(keys / "head-signing.pub"), "--state-dir", str(tmp_path / "edge"),
            "--threads", "1", log=f"{device}.log",
        )

    # 120 s of audio is 40 windows: rounds after 16, 32 and 40 of them.
    start_recorder("rec-a", data_dir / "soundscapes/birdnet-example/soundscape.flac")

    def adapted():
        versions = _published_versions(server_state, site)
        ack = _last_ack(observer, "rec-a")
        return (len(versions) >= 2 and ack is not None and ack.accepted and ack.version == versions[-1]
                and "source finished" in programs.log("rec-a.log"))

    def settled():
        # A last round may still run after the recorder's final message, so wait for 8 s without a new manifest.
        if not adapted():
            return False
        published = len(observer.manifests)
        time.sleep(8)
        return len(observer.manifests) == published and adapted()

    assert _wait(settled, 300), programs.log("server.log")[-3000:]
    versions = _published_versions(server_state, site)
    replaced = Manifest.decode(observer.manifests[-1])
    assert replaced.version == versions[-1]
    assert replaced.signature is not None

    unknown = subprocess.run(
        [sys.executable, "-m", "dawnchorus", "server", "rollback", site, "99", "--broker", mosquitto.address,
         "--state-dir", str(server_state), *signing], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2
    assert "roll back to one of v1" in unknown.stderr

    target = versions[0]
    rollback = subprocess.run(
        [sys.executable, "-m", "dawnchorus", "server", "rollback", site, str(target), "--broker",
         mosquitto.address, "--state-dir", str(server_state), *signing],
        capture_output=True, text=True, timeout=120)
    assert rollback.returncode == 0, rollback.stderr
    assert f"rollback to head v{target} published" in rollback.stdout
    assert observer.wait_for(lambda: any(ack.accepted and ack.version == target
                                         for ack in observer.acks_of("rec-a")), 60), programs.log("rec-a.log")
    rollback_manifest = Manifest.decode(observer.manifests[-1])
    assert rollback_manifest.rollback
    assert rollback_manifest.sequence > replaced.sequence

    # Published without retain, so that the rollback stays the site's retained manifest.
    replayed = observer.push(replaced.encode(), None, None, site, "rec-a", retain=False)
    assert not replayed.accepted
    assert "(replay)" in replayed.reason
    assert "rollback to head v%d verified" % target in programs.log("rec-a.log")

    # New embeddings make the base station adapt again, from the rolled-back head.
    start_recorder("rec-b", data_dir / "soundscapes/opensoundscape")

    def readapted():
        newer = [v for v in _published_versions(server_state, site) if v > versions[-1]]
        if not newer:
            return None
        acks = [_last_ack(observer, device) for device in ("rec-a", "rec-b")]
        if all(ack is not None and ack.accepted and ack.version == newer[-1] for ack in acks):
            return newer[-1]
        return None

    latest = _wait(readapted, 300)
    assert latest, programs.log("server.log")[-3000:]
    first_after = min(v for v in _published_versions(server_state, site) if v > versions[-1])
    record = json.loads((server_state / "sites" / site / "heads" / f"v{first_after}.json").read_text())
    assert record["parent"] == target
    assert f"rolled back to head v{target}" in programs.log("server.log")

    rejections_b = len([ack for ack in observer.acks_of("rec-b") if not ack.accepted])
    replayed_rollback = observer.push(rollback_manifest.encode(), None, None, site, "rec-a", retain=False)
    assert not replayed_rollback.accepted
    assert "(replay)" in replayed_rollback.reason
    assert observer.wait_for(
        lambda: len([ack for ack in observer.acks_of("rec-b") if not ack.accepted]) > rejections_b, 30)
    assert "(replay)" in observer.acks_of("rec-b")[-1].reason
    assert server.poll() is None


@pytest.fixture(scope="module")
def site_head():
    labels = ["Turdus migratorius_American Robin", "Cardinalis cardinalis_Northern Cardinal",
              "Zenaida macroura_Mourning Dove"]
    head = load_source_model().head.select(labels)
    return head.labels, head_to_tflite(head, "fp32")


def _signed_manifest(private_key, site: str, labels: list[str], blob: bytes, version: int,
                     sequence: int) -> Manifest:
    probe = np.random.default_rng(version).random((4, 1024), dtype=np.float32)
    probe = probe.astype(np.float16).astype(np.float32)
    manifest = Manifest(
        site=site, version=version, parent=version - 1, labels=labels, sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob), precision="fp32", blob_topic=topics.blob_topic(site, version), created=time.time(),
        probe_embeddings=probe, probe_logits=TFLiteHead(blob, labels, version).logits(probe), sequence=sequence,
    )
    return sign_manifest(manifest, private_key)


@pytest.mark.slow
def test_recorder_killed_during_swap_restarts_complete(programs, observer, mosquitto, site_head, data_dir,
                                                       tmp_path):
    site, device = "kill-site", "rec-kill"
    labels, blob = site_head
    keys = _generate_keys(tmp_path / "keys")
    private_key = load_private_key(keys / "head-signing.key")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(labels) + "\n")
    heads_dir = tmp_path / "edge" / device / "heads"

    def start_recorder(log: str):
        return programs.start(
            "edge", "run", "--device", device, "--site", site, "--broker", mosquitto.address,
            "--input", str(data_dir / "soundscapes/opensoundscape/birds_10s.wav"), "--speed", "0", "--stay",
            "--species-file", str(species), "--head-public-key", str(keys / "head-signing.pub"),
            "--state-dir", str(tmp_path / "edge"), "--threads", "1", log=log,
        )

    def acked(version: int):
        return observer.wait_for(lambda: any(ack.accepted and ack.version == version
                                             for ack in observer.acks_of(device)), 120)

    recorder = start_recorder("recorder-0.log")
    assert observer.wait_online(device), programs.log("recorder-0.log")[-3000:]
    first = _signed_manifest(private_key, site, labels, blob, 1, 1)
    applied = observer.push(first.encode(), first.blob_topic, blob, site, device)
    assert applied.accepted, applied.reason

    # The first kills land as soon as the swap writes its first file, later ones a little after.
    outcomes = {}
    for attempt, delay_s in enumerate([0.0, 0.0, 0.001, 0.003, 0.01, 0.03], start=1):
        version = attempt + 1
        manifest = _signed_manifest(private_key, site, labels, blob, version, version)
        before = set(os.listdir(heads_dir))
        observer.client.publish(manifest.blob_topic, blob, qos=1, retain=True).wait_for_publish(10)
        observer.client.publish(topics.manifest_topic(site), manifest.encode(), qos=1,
                                retain=True).wait_for_publish(10)
        changed = False
        deadline = time.monotonic() + 60
        while not changed and time.monotonic() < deadline:
            changed = set(os.listdir(heads_dir)) != before
        assert changed, f"attempt {attempt}: the recorder wrote nothing to its head store"
        time.sleep(delay_s)
        recorder.kill()
        recorder.wait(timeout=30)

        log = f"recorder-{attempt}.log"
        recorder = start_recorder(log)
        # The killed process may already have acknowledged this version, so the
        # ack alone does not show that the new process has read its head store.
        assert _wait(lambda: f"recorder {device} starting" in programs.log(log), 120), programs.log(log)[-3000:]
        assert acked(version), programs.log(log)[-3000:]
        restored = re.search(r"restored head v(\d+) of site", programs.log(log))
        assert restored is not None, f"attempt {attempt}: the recorder restarted on the source head"
        outcomes[attempt] = int(restored.group(1))
        assert outcomes[attempt] in (version - 1, version), outcomes
        assert not [name for name in os.listdir(heads_dir) if name.endswith(".partial")]

    assert recorder.poll() is None
    print(f"head restored after each kill (attempt: version): {outcomes}")
