"""`coordinator certs --out DIR`: a private CA and a SuperLink server certificate, made with `cryptography`.

Files written (private keys 0600)::

    DIR/ca.crt       the CA certificate: give it to every data owner (`client join --root-cert ca.crt`)
    DIR/ca.key       the CA's private key: keep it, it signs server certificates
    DIR/server.pem   the SuperLink's certificate, signed by the CA, valid for the listed hosts
    DIR/server.key   the SuperLink's private key

Data owners' node keys are made on their own machines (`client keys --out DIR`); only the public
halves reach the coordinator.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedadapt.paths import atomic_write_bytes

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertError(ValueError):
    """Certificates that are missing or unusable; one line naming the file and the fix."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def generate_certificates(out: str | Path, hosts: list[str] | None = None, days: int = 365,
                          overwrite: bool = False) -> TlsFiles:
    """Write a CA and a server certificate for ``hosts`` (DNS names or IP addresses) into ``out``."""
    out = Path(out).expanduser()
    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *(hosts or [])]))
    if days < 1:
        raise CertError(f"--days {days}: certificates must be valid for at least one day")
    existing = [n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY) if (out / n).exists()]
    if existing and not overwrite:
        raise CertError(f"{out} already holds {', '.join(existing)}: pass --force to replace them or choose another --out")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedadapt coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = _key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    for name in (CA_CERT, SERVER_CERT):
        os.chmod(out / name, 0o644)  # public: the CA certificate is handed to every data owner
    for name, key in ((CA_KEY, ca_key), (SERVER_KEY, server_key)):
        atomic_write_bytes(out / name, _key_pem(key))
        os.chmod(out / name, 0o600)
    return TlsFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY)


def tls_files(certs_dir: str | Path) -> TlsFiles:
    """The TLS files in ``certs_dir``, checked: present, parseable, server cert signed by the CA and in date."""
    d = Path(certs_dir).expanduser()
    files = TlsFiles(d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY)
    for p in (files.ca_cert, files.server_cert, files.server_key):
        if not p.is_file():
            raise CertError(f"{p} is missing: create certificates with `coordinator certs --out {d}` or pass --insecure for a local experiment")
    try:
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    except ValueError as e:
        raise CertError(f"certificates in {d} cannot be read ({e}): recreate them with `coordinator certs --out {d} --force`") from None
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise CertError(f"{files.server_cert} is not signed by {files.ca_cert} ({type(e).__name__}): recreate both with `coordinator certs`") from None
    if key.public_key().public_numbers() != server.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertError(f"{files.server_key} does not belong to {files.server_cert}: recreate both with `coordinator certs`")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not server.not_valid_before_utc <= now <= server.not_valid_after_utc:
        raise CertError(f"{files.server_cert} is not valid now (valid {server.not_valid_before_utc:%Y-%m-%d} to "
                        f"{server.not_valid_after_utc:%Y-%m-%d}): recreate it with `coordinator certs --force`")
    return files


def server_hosts(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(i) for i in san.get_values_for_type(x509.IPAddress))]


def load_node_public_key(path: str | Path) -> bytes:
    """A data owner's public key (OpenSSH format, NIST EC curve, as Flower requires), checked; its bytes."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CertError(f"node public key {p} not found: ask the data owner for the .pub file `client keys` wrote")
    data = p.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertError(f"{p} is not an OpenSSH public key ({e}): use the .pub file written by `client keys`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{p} is a {type(key).__name__}, not an elliptic-curve key: Flower needs a NIST EC key from `client keys`")
    return data


def authorized_key_files(path: str | Path) -> list[Path]:
    """``path`` is one .pub file or a folder of them; every one is checked."""
    p = Path(path).expanduser()
    files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
    if not files:
        raise CertError(f"{p} holds no .pub files: copy each data owner's public key (from `client keys`) into it")
    for f in files:
        load_node_public_key(f)
    return files


def cmd_certs(args) -> int:
    from rich.console import Console

    files = generate_certificates(args.out, hosts=args.host, days=args.days, overwrite=args.force)
    c = Console()
    c.print(f"[green]wrote[/] {files.ca_cert}, {files.server_cert}, {files.server_key} (valid for "
            f"{', '.join(server_hosts(files.server_cert))}; {args.days} days)")
    c.print(f"give [bold]{files.ca_cert}[/] to each data owner (`client join --root-cert ca.crt ...`); "
            f"start the coordinator with `coordinator serve --certs {Path(args.out)}`")
    return 0


def register_certs(sub) -> None:
    c = sub.add_parser("certs", help="create a CA and a SuperLink TLS certificate")
    c.add_argument("--out", required=True, help="folder to write ca.crt, ca.key, server.pem, server.key into")
    c.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address clients use to reach the coordinator (repeatable); "
                        "localhost and 127.0.0.1 are always included")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="replace certificates already in --out")
    c.set_defaults(func=cmd_certs)
