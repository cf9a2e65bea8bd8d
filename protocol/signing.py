"""Ed25519 signatures on head manifests, and the key files that hold the keys.

The base station signs every manifest with its private key, and a recorder
verifies it with the public key it was given at provisioning. The signature
covers the manifest's signed content: a fixed prefix, then the manifest's
every field except the signature as JSON with sorted keys, no whitespace and
ASCII escapes. Both sides build that JSON from the decoded fields
(``Manifest.signed_record``), so a manifest that was decoded and encoded
again still verifies, and a change to any signed field breaks the signature.

Key files are PEM: PKCS#8 without encryption for the private key (like an SSH
host key, it is protected by its file mode, 0600), SubjectPublicKeyInfo for
the public key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dawnchorus.protocol.messages import Manifest, ManifestSignature

_LOGGER = logging.getLogger(__name__)

# The prefix keeps a manifest signature from being valid for any other message
# that the same key might sign in a later protocol.
SIGNING_CONTEXT = b"dawnchorus head manifest v2\n"

PRIVATE_KEY_NAME = "head-signing.key"
PUBLIC_KEY_NAME = "head-signing.pub"


class SignatureError(ValueError):
    """A manifest that is unsigned, or whose signature does not verify with the given key."""


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key of the expected kind."""


def signed_content(manifest: Manifest) -> bytes:
    """Return the bytes that the manifest's signature covers."""
    canonical = json.dumps(manifest.signed_record(), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    return SIGNING_CONTEXT + canonical.encode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the first 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> Manifest:
    """Return a copy of ``manifest`` signed with ``private_key``. The input stays unchanged."""
    signed = dataclasses.replace(manifest, signature=None)
    value = private_key.sign(signed_content(signed))
    signed.signature = ManifestSignature(key_id=key_id(private_key.public_key()), value=value)
    return signed


def verify_manifest(manifest: Manifest, public_key: Ed25519PublicKey) -> None:
    """Raise SignatureError unless ``manifest`` carries a valid signature by ``public_key``."""
    if manifest.signature is None:
        raise SignatureError("manifest is not signed")
    try:
        public_key.verify(manifest.signature.value, signed_content(manifest))
    except InvalidSignature:
        expected = key_id(public_key)
        if manifest.signature.key_id != expected:
            raise SignatureError(
                f"signature does not verify: the manifest names signing key {manifest.signature.key_id}, "
                f"but this recorder's head public key is {expected}. Provision the recorder with the "
                "base station's public key"
            ) from None
        raise SignatureError(f"signature by key {expected} does not verify: the manifest was changed "
                             "after it was signed, or the signature is invalid") from None


# Key files ---------------------------------------------------------------------


def generate_key_files(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a new key pair to ``directory`` and return the private and public key paths.

    The private key file gets mode 0600, and the directory is created with
    mode 0700 if it does not exist.

    Raises:
        KeyFileError: if a key file already exists there, because it is never overwritten.
    """
    directory = pathlib.Path(directory)
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists and is not overwritten: recorders that trust its key "
                               "would reject every head signed by a new one. Choose another directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL: a file created between the check above and here is not overwritten either.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(private_pem)
    descriptor = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(public_pem)
    _LOGGER.info("generated head signing key %s in %s", key_id(private_key.public_key()), directory)
    return private_path, public_path


def _read_pem(path: pathlib.Path, what: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} not found: create a key pair with "
                           "'dawnchorus keys generate DIR'") from None
    except OSError as error:
        raise KeyFileError(f"{what} {path} could not be read: {error}") from None


def load_private_key(path: pathlib.Path) -> Ed25519PrivateKey:
    """Load the base station's signing key, warning if other users can read the file."""
    data = _read_pem(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"signing key {path} is not an unencrypted PEM private key ({error}): use the "
                           f"{PRIVATE_KEY_NAME} file that 'dawnchorus keys generate DIR' wrote") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is a {type(key).__name__}, expected an Ed25519 key: "
                           "create one with 'dawnchorus keys generate DIR'")
    mode = pathlib.Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        _LOGGER.warning("signing key %s has mode %03o, so other users can read it: run chmod 600 %s",
                        path, mode, path)
    return key


def load_public_key(path: pathlib.Path) -> Ed25519PublicKey:
    """Load the public key that a recorder verifies head manifests with."""
    data = _read_pem(path, "head public key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"head public key {path} contains a private key: give recorders only the "
                           f"{PUBLIC_KEY_NAME} file, and keep {PRIVATE_KEY_NAME} on the base station")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"head public key {path} is not a PEM public key ({error}): use the "
                           f"{PUBLIC_KEY_NAME} file that 'dawnchorus keys generate DIR' wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"head public key {path} is a {type(key).__name__}, expected an Ed25519 key")
    return key
