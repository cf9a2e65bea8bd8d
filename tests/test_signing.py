"""Manifest signatures and key files: what a recorder accepts, and what it must reject."""

from __future__ import annotations

import dataclasses
import json
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dawnchorus.protocol import signing, topics
from dawnchorus.protocol.messages import Manifest


@pytest.fixture(scope="module")
def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _manifest(**changes) -> Manifest:
    rng = np.random.default_rng(2)
    manifest = Manifest(
        site="forest-a", version=4, parent=3, labels=["A a_Aa", "B b_Bb", "C c_Cc"], sha256="cd" * 32,
        size=3000, precision="fp16", blob_topic=topics.blob_topic("forest-a", 4), created=1_733_300_000.25,
        probe_embeddings=rng.random((4, 1024), dtype=np.float32).astype(np.float16).astype(np.float32),
        probe_logits=rng.standard_normal((4, 3)).astype(np.float32),
        stats={"loss": 0.125, "buffer": 512, "mean_pseudo_label": 0.0123456789}, sequence=41,
    )
    return dataclasses.replace(manifest, **changes)


def test_signed_manifest_verifies_after_decode(private_key):
    signed = signing.sign_manifest(_manifest(), private_key)
    decoded = Manifest.decode(signed.encode())
    signing.verify_manifest(decoded, private_key.public_key())
    assert decoded.signature.key_id == signing.key_id(private_key.public_key())


def test_signed_manifest_verifies_after_second_round_trip(private_key):
    # A recorder stores the decoded manifest by encoding it again.
    decoded = Manifest.decode(signing.sign_manifest(_manifest(), private_key).encode())
    again = Manifest.decode(decoded.encode())
    signing.verify_manifest(again, private_key.public_key())


def test_sign_manifest_leaves_input_unsigned(private_key):
    manifest = _manifest()
    signing.sign_manifest(manifest, private_key)
    assert manifest.signature is None


def test_unsigned_manifest_rejected(private_key):
    decoded = Manifest.decode(_manifest().encode())
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify_manifest(decoded, private_key.public_key())


def test_manifest_from_other_key_rejected(private_key):
    other = Ed25519PrivateKey.generate()
    decoded = Manifest.decode(signing.sign_manifest(_manifest(), other).encode())
    with pytest.raises(signing.SignatureError) as raised:
        signing.verify_manifest(decoded, private_key.public_key())
    assert signing.key_id(other.public_key()) in str(raised.value)
    assert signing.key_id(private_key.public_key()) in str(raised.value)


@pytest.mark.parametrize("field, value", [
    ("version", 5), ("parent", 1), ("site", "meadow"), ("labels", ["A a_Aa", "B b_Bb", "D d_Dd"]),
    ("sha256", "ce" * 32), ("size", 2999), ("precision", "fp32"), ("created", 1_733_300_001.0),
    ("sequence", 42), ("rollback", True), ("blob_topic", topics.blob_topic("forest-a", 5)),
])
def test_changed_field_breaks_signature(private_key, field, value):
    record = json.loads(signing.sign_manifest(_manifest(), private_key).encode())
    record[field] = value
    decoded = Manifest.decode(json.dumps(record).encode())
    with pytest.raises(signing.SignatureError, match="changed after it was signed"):
        signing.verify_manifest(decoded, private_key.public_key())


def test_changed_probe_breaks_signature(private_key):
    signed = signing.sign_manifest(_manifest(), private_key)
    changed = dataclasses.replace(signed, probe_logits=signed.probe_logits + 1e-3)
    with pytest.raises(signing.SignatureError):
        signing.verify_manifest(Manifest.decode(changed.encode()), private_key.public_key())


def test_changed_stats_break_signature(private_key):
    record = json.loads(signing.sign_manifest(_manifest(), private_key).encode())
    record["stats"]["loss"] = 0.25
    with pytest.raises(signing.SignatureError):
        signing.verify_manifest(Manifest.decode(json.dumps(record).encode()), private_key.public_key())


def test_signed_content_ignores_key_order(private_key):
    signed = signing.sign_manifest(_manifest(), private_key)
    record = json.loads(signed.encode())
    reordered = json.dumps(dict(reversed(list(record.items()))), indent=2).encode()
    signing.verify_manifest(Manifest.decode(reordered), private_key.public_key())


def test_generate_key_files_writes_loadable_pair(tmp_path):
    private_path, public_path = signing.generate_key_files(tmp_path / "keys")
    private_key = signing.load_private_key(private_path)
    public_key = signing.load_public_key(public_path)
    assert signing.key_id(private_key.public_key()) == signing.key_id(public_key)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_generate_key_files_never_overwrites(tmp_path):
    private_path, _ = signing.generate_key_files(tmp_path)
    before = private_path.read_bytes()
    with pytest.raises(signing.KeyFileError, match="already exists"):
        signing.generate_key_files(tmp_path)
    assert private_path.read_bytes() == before


def test_load_public_key_rejects_private_key_file(tmp_path):
    private_path, _ = signing.generate_key_files(tmp_path)
    with pytest.raises(signing.KeyFileError, match="contains a private key"):
        signing.load_public_key(private_path)


def test_load_private_key_rejects_public_key_file(tmp_path):
    _, public_path = signing.generate_key_files(tmp_path)
    with pytest.raises(signing.KeyFileError, match="not an unencrypted PEM private key"):
        signing.load_private_key(public_path)


def test_load_key_missing_file_names_fix(tmp_path):
    with pytest.raises(signing.KeyFileError, match="dawnchorus keys generate"):
        signing.load_public_key(tmp_path / "nowhere.pub")
