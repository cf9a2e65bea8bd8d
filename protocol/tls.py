"""TLS settings of an MQTT connection, shared by recorders, base stations and ``server rollback``."""

from __future__ import annotations

import dataclasses
import pathlib
import ssl


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    """PEM files that secure one MQTT connection with TLS.

    The client checks that the broker's certificate was signed by ``ca_file``
    and names the host it connects to. With ``cert_file`` and ``key_file``
    it also proves its own identity, which a broker configured with
    ``require_certificate`` and ``use_identity_as_username`` (as
    deploy/mosquitto/dawnchorus-tls.conf) takes as the MQTT user name.

    Attributes:
        ca_file: certificate of the CA that signed the broker's certificate.
        cert_file: this client's certificate, or None for a broker that
            authenticates clients by user name and password.
        key_file: the unencrypted private key of ``cert_file``.
    """

    ca_file: pathlib.Path
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key and a key needs its certificate: "
                             "give both --mqtt-cert and --mqtt-key, or neither")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not pathlib.Path(path).is_file():
                raise ValueError(f"TLS file {path} not found: check the path, or create the credentials with "
                                 "deploy/make-credentials.sh")

    def apply(self, client) -> None:
        """Turn on TLS for a ``paho.mqtt.client.Client`` before it connects.

        Raises ValueError, naming the files, when they are not a valid PEM
        certificate and matching key.
        """
        try:
            client.tls_set(
                ca_certs=str(self.ca_file),
                certfile=None if self.cert_file is None else str(self.cert_file),
                keyfile=None if self.key_file is None else str(self.key_file),
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except ssl.SSLError as error:
            files = ", ".join(str(path) for path in (self.ca_file, self.cert_file, self.key_file) if path is not None)
            raise ValueError(f"invalid TLS files ({files}): {error}. Expected PEM files: the CA certificate, and "
                             "this client's certificate with its unencrypted key") from error
