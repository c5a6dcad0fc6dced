"""Signed models: ``shardserve sign`` / ``shardserve verify`` and the load-time check.

The signature is the OpenSSF model-signing format (sigstore/model-transparency,
"private key" method): ``model.sig`` in the version directory is a Sigstore
bundle (JSON) holding a DSSE envelope whose payload is an in-toto statement
with predicate ``https://model_signing/signature/v1.0``: every file's SHA-256
("resources") and a root digest over them. The DSSE PAE is signed with ECDSA
(P-256/SHA-256, P-384/SHA-384) or Ed25519. Files the signature ignores: the
signature itself and ``*.dek`` wrapped-key sidecars (authenticated by the
master key; ``shardserve rotate`` rewrites them without invalidating the
signature). Symlinks are refused.

At load, before any byte reaches a backend, the first file read of a version
verifies the bundle against ``[security] trusted_keys`` (PEM public keys) and
every file's digest; the error names the file that failed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import hookimpl
from runtime.errors import ConfigError, ModelLoadError

from .settings import settings

if TYPE_CHECKING:
    import argparse

SIGNATURE_FILE = "model.sig"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IGNORED_SUFFIXES = (".dek",)
CHUNK = 1 << 20


class SignatureError(Exception):
    """Verification failed; the message names the file, never a path."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _sha256(data: bytes = b"") -> Any:
    """``hashlib.sha256``, imported on first use: a cold start that verifies nothing skips
    loading OpenSSL."""
    import hashlib

    return hashlib.sha256(data)


def file_digest(path: Path) -> str:
    h = _sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_files(root: Path, ignore: str = SIGNATURE_FILE) -> list[str]:
    """Every signed file under ``root`` (POSIX relative names, sorted)."""
    names = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise SignatureError(f"{rel} is a symlink")
        if path.is_file() and rel != ignore and not rel.endswith(IGNORED_SUFFIXES):
            names.append(rel)
    return names


def statement(root: Path, digests: dict[str, str]) -> dict:
    resources = [{"name": n, "algorithm": "sha256", "digest": digests[n]} for n in sorted(digests)]
    root_digest = _sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources))
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": root.name, "digest": {"sha256": root_digest.hexdigest()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": [SIGNATURE_FILE]},
            "resources": resources,
        },
    }


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _sign_bytes(private_key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        digest = {256: hashes.SHA256(), 384: hashes.SHA384()}.get(private_key.curve.key_size)
        if digest is not None:
            return private_key.sign(data, ec.ECDSA(digest))
    raise ConfigError("signing keys must be EC P-256, P-384 or Ed25519")


def _verify_bytes(public_key: Any, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            digest = {256: hashes.SHA256(), 384: hashes.SHA384()}[public_key.curve.key_size]
            public_key.verify(signature, data, ec.ECDSA(digest))
        else:
            return False
    except (InvalidSignature, KeyError, ValueError):
        return False
    return True


def sign_directory(root: Path, private_key: Any) -> Path:
    """Write ``root/model.sig`` over every file in ``root``."""
    import base64

    digests = {name: file_digest(root / name) for name in model_files(root)}
    payload = json.dumps(statement(root, digests), separators=(",", ":")).encode()
    signature = _sign_bytes(private_key, pae(PAYLOAD_TYPE, payload))
    hint = _sha256(_public_pem(private_key.public_key())).hexdigest()
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": hint},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }
    from plugins.atomic_files import write_atomically  # (not a cold start's)

    target = root / SIGNATURE_FILE
    write_atomically(target, json.dumps(bundle, indent=2).encode())
    return target


def verified_manifest(bundle_bytes: bytes, public_keys: list) -> dict[str, str]:
    """name -> sha256 hex from a bundle whose signature one trusted key verifies."""
    import base64

    try:
        bundle = json.loads(bundle_bytes)
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        sig = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        payload_type = envelope["payloadType"]
        hint = bundle.get("verificationMaterial", {}).get("publicKey", {}).get("hint")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise SignatureError(f"{SIGNATURE_FILE} is malformed") from None
    if payload_type != PAYLOAD_TYPE:
        raise SignatureError(f"{SIGNATURE_FILE} has an unexpected payload type")
    candidates = [k for k in public_keys
                  if not hint or _sha256(_public_pem(k)).hexdigest() == hint] or public_keys
    if not any(_verify_bytes(k, sig, pae(payload_type, payload)) for k in candidates):
        raise SignatureError(f"{SIGNATURE_FILE} is not signed by a trusted key")
    try:
        doc = json.loads(payload)
        if doc["_type"] != STATEMENT_TYPE or doc["predicateType"] != PREDICATE_TYPE:
            raise ValueError
        resources = doc["predicate"]["resources"]
        manifest = {r["name"]: r["digest"] for r in resources if r["algorithm"] == "sha256"}
        root = _sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources))
        if root.hexdigest() != doc["subject"][0]["digest"]["sha256"]:
            raise ValueError
    except (ValueError, KeyError, IndexError, TypeError):
        raise SignatureError(f"{SIGNATURE_FILE} holds a malformed manifest") from None
    return manifest


def verify_directory(root: Path, public_keys: list, first: tuple[str, bytes] | None = None
                     ) -> list[str]:
    """Check every file under ``root`` against its signature; returns the names.

    ``first`` is (name, bytes) of a file already in memory, hashed from those
    bytes so what a backend gets is exactly what was checked.
    """
    sig = root / SIGNATURE_FILE
    if not sig.is_file():
        raise SignatureError(f"{first[0] if first else 'the model'} is not signed "
                             f"({SIGNATURE_FILE} is missing)")
    manifest = verified_manifest(sig.read_bytes(), public_keys)
    present = model_files(root)
    for name in present:
        if name not in manifest:
            raise SignatureError(f"{name} is not covered by the signature")
        if first is not None and name == first[0]:
            digest = _sha256(first[1]).hexdigest()
        else:
            digest = file_digest(root / name)
        if digest != manifest[name]:
            raise SignatureError(f"{name} does not match its signature")
    missing = sorted(set(manifest) - set(present))
    if missing:
        raise SignatureError(f"{missing[0]} is signed but missing")
    return present


def load_public_keys(paths: list) -> list:
    from cryptography.hazmat.primitives import serialization

    keys = []
    for index, path in enumerate(paths):
        try:
            keys.append(serialization.load_pem_public_key(Path(path).read_bytes()))
        except (OSError, ValueError):
            raise ConfigError(f"security.trusted_keys[{index}] is not a readable PEM public key"
                              ) from None
    return keys


_keys_cache: dict[tuple, list] = {}
_lock = threading.Lock()


@hookimpl(tryfirst=True)
def shardserve_transform_model_bytes(model: str, version: str, filename: str, data: bytes,
                                     config: Any) -> bytes | None:
    sec = settings(config)
    paths = sec.raw.get("trusted_keys", [])
    root = Path(config.repository) / model / version
    required = sec.raw.get("require_signed", False)
    if not required and not (paths and (root / SIGNATURE_FILE).is_file()):
        return None
    if not paths:
        raise ModelLoadError(f"model {model!r} version {version}: require_signed is set but "
                             "no trusted_keys are configured")
    with _lock:
        keys = _keys_cache.get(tuple(paths)) or load_public_keys(paths)
        _keys_cache[tuple(paths)] = keys
    try:
        verify_directory(root, keys, first=(filename, data))
    except SignatureError as exc:
        raise ModelLoadError(f"model {model!r} version {version}: {exc}") from None
    return None


# CLI ------------------------------------------------------------------------


def _version_dirs(target: Path) -> list[Path]:
    """A version directory, or every numeric version of a model directory."""
    if (target / "model.toml").is_file():
        return sorted(p for p in target.iterdir() if p.is_dir() and p.name.isdigit())
    return [target]


def cmd_sign(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    password = os.environ.get("SHARDSERVE_SIGNING_KEY_PASSWORD")
    private_key = serialization.load_pem_private_key(
        Path(args.key).read_bytes(), password.encode() if password else None)
    for root in _version_dirs(Path(args.model_dir)):
        print(f"signed {sign_directory(root, private_key)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    keys = load_public_keys(args.key)
    status = 0
    for root in _version_dirs(Path(args.model_dir)):
        try:
            names = verify_directory(root, keys)
            print(f"OK {root}: {len(names)} file(s) verified")
        except SignatureError as exc:
            print(f"FAILED {root}: {exc}")
            status = 1
    return status


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("sign", help="sign a model (OpenSSF model-signing format)")
    p.add_argument("model_dir", help="a version directory, or a model directory (all versions)")
    p.add_argument("--key", required=True, help="PEM private key (EC P-256/P-384 or Ed25519)")
    p.set_defaults(func=cmd_sign)
    p = subparsers.add_parser("verify", help="verify a model's signature and every file")
    p.add_argument("model_dir")
    p.add_argument("--key", required=True, action="append", help="trusted PEM public key")
    p.set_defaults(func=cmd_verify)
