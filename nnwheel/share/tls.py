"""The index's TLS certificate: the one given (--tls-cert/--tls-key), or one generated for this machine (--tls).

A generated certificate is self-signed and names what clients may call this machine: localhost, its host
names, the address the index listens on and the addresses its name resolves to. Clients trust exactly
that file (pip --cert DIR/tls/cert.pem); it is made again only once it has expired or lacks the listening
address, so a copy that clients keep stays valid.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

from ..errors import UsageError
from .index_files import IndexConfig, write_private

VALID_DAYS = 825


def certificate_files(index_dir: Path, config: IndexConfig) -> tuple[Path, Path]:
    """The certificate and key nginx serves: the given ones, else the generated ones (made when needed)."""
    if config.tls_cert and config.tls_key:
        return Path(config.tls_cert), Path(config.tls_key)
    cert, key = generated_cert(index_dir), index_dir / "tls" / "key.pem"
    names = _names(config.host)
    if not (cert.exists() and key.exists() and _still_good(cert, names)):
        _generate(cert, key, names)
    return cert, key


def generated_cert(index_dir: Path) -> Path:
    return index_dir / "tls" / "cert.pem"


def _names(host: str) -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    if host not in ("0.0.0.0", "::"):
        names.add(host)
    try:
        names.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass  # a host name that does not resolve: clients then use an address
    return {name for name in names if name and "%" not in name}  # not fe80::1%eth0: valid on one link only


def _still_good(cert: Path, names: set[str]) -> bool:
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    named = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    listed = {str(value) for value in named.get_values_for_type(x509.IPAddress)}
    listed |= set(named.get_values_for_type(x509.DNSName))
    wanted = {str(ipaddress.ip_address(name)) if _is_address(name) else name for name in names}
    return certificate.not_valid_after_utc > soon and wanted <= listed


def _generate(cert: Path, key: Path, names: set[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nnwheel index on {socket.gethostname()}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternative = [
        x509.IPAddress(ipaddress.ip_address(name)) if _is_address(name) else x509.DNSName(name) for name in sorted(names)
    ]
    public_key = private_key.public_key()
    # Its own CA (critical basic constraints, key identifiers): what strict verifiers (Python 3.13's
    # VERIFY_X509_STRICT) want of a certificate that is at once the trust anchor and the server's.
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
    )
    certificate = builder.sign(private_key, hashes.SHA256())
    cert.parent.mkdir(mode=0o700, exist_ok=True)
    write_private(
        key,
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def trusting(ca_file: str, option: str) -> ssl.SSLContext:
    """A client context that trusts the CA file a user gave with `option`: one that is missing or holds no PEM
    certificate is a UsageError, before anything connects."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as error:  # ssl.SSLError for a file without a certificate
        raise UsageError(f"{option} {ca_file} is not a CA certificate ({error.strerror or error}): give the CA's PEM file") from None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
