"""Models encrypted at rest: ``shardserve encrypt`` / ``rotate`` and load-time decryption.

An encrypted file keeps its name (``model.onnx``) and holds::

    b"SSENC1\\0" | header length (4 bytes, big endian) | header JSON | chunks

Each chunk is AES-256-GCM ciphertext plus its 16-byte tag, with nonce =
8 random bytes || chunk index and associated data = SHA-256(header) || index
|| last-chunk flag, so chunks cannot be reordered, dropped or moved between
files. Chunking keeps every GCM call under its 2^31-byte limit and lets the
CLI stream files of any size in constant memory. The random per-file data
key is wrapped (AES-256-GCM) by the master key and kept in ``<file>.dek``;
``rotate`` rewraps only these small sidecars. The master key is 32 bytes,
base64, from ``$SHARDSERVE_MASTER_KEY`` (``[security] master_key_env`` to
rename it) or ``[security] master_key_file``. Plaintext exists only in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from runtime import hookimpl
from runtime.errors import ConfigError, ModelLoadError

from .settings import read_key_material, settings

if TYPE_CHECKING:
    import argparse

MAGIC = b"SSENC1\0"
DEFAULT_CHUNK = 64 << 20
TAG = 16
MAX_HEADER = 4096
DEFAULT_MASTER_ENV = "SHARDSERVE_MASTER_KEY"


class DecryptionError(Exception):
    """The file or its wrapped key does not authenticate; message is client-safe."""


def master_key_id(master: bytes) -> str:
    import hashlib  # here, not at import: a cold start that decrypts nothing skips OpenSSL

    return hashlib.sha256(b"shardserve-master-key-id" + master).hexdigest()[:16]


def _check_master(master: bytes) -> bytes:
    if len(master) != 32:
        raise ConfigError("the master key must be 32 bytes (base64 in the environment or file)")
    return master


def wrap_key(master: bytes, data_key: bytes, filename: str) -> dict:
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    wrapped = AESGCM(master).encrypt(nonce, data_key, b"shardserve-dek:" + filename.encode())
    return {"version": 1, "master_key_id": master_key_id(master),
            "nonce": base64.b64encode(nonce).decode(),
            "wrapped": base64.b64encode(wrapped).decode()}


def unwrap_key(master: bytes, doc: dict, filename: str) -> bytes:
    import base64

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        nonce, wrapped = base64.b64decode(doc["nonce"]), base64.b64decode(doc["wrapped"])
        return AESGCM(master).decrypt(nonce, wrapped, b"shardserve-dek:" + filename.encode())
    except (InvalidTag, KeyError, TypeError, ValueError):
        raise DecryptionError(f"{filename}: the data key does not unwrap with this master key "
                              ) from None


def _aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return header_digest + struct.pack(">IB", index, last)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def encrypt_stream(src: BinaryIO, dst: BinaryIO, size: int, data_key: bytes, filename: str,
                   chunk_size: int = DEFAULT_CHUNK) -> None:
    """Encrypt ``size`` bytes from ``src`` to ``dst``, one chunk in memory at a time."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    prefix = os.urandom(8)  # what secrets.token_bytes returns, without importing it
    header = json.dumps({"alg": "AES-256-GCM", "chunk_size": chunk_size, "size": size,
                         "nonce_prefix": prefix.hex(), "file": filename}).encode()
    digest = hashlib.sha256(header).digest()
    dst.write(MAGIC + struct.pack(">I", len(header)) + header)
    aead = AESGCM(data_key)
    count = max(1, -(-size // chunk_size))
    if count >= 2**32:
        raise ConfigError("file too large for this chunk size")
    for index in range(count):
        chunk = src.read(chunk_size)
        aad = _aad(digest, index, index == count - 1)
        dst.write(aead.encrypt(_nonce(prefix, index), chunk, aad))


def _header(data: memoryview | bytes) -> tuple[dict, bytes, int]:
    if len(data) < len(MAGIC) + 4 or bytes(data[:len(MAGIC)]) != MAGIC:
        raise DecryptionError("not an encrypted model file")
    (length,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if not 0 < length <= MAX_HEADER or start + length > len(data):
        raise DecryptionError("encrypted file header is malformed")
    raw = bytes(data[start:start + length])
    import hashlib

    try:
        header = json.loads(raw)
        if header["alg"] != "AES-256-GCM" or int(header["chunk_size"]) <= 0:
            raise ValueError
        int(header["size"]), bytes.fromhex(header["nonce_prefix"])
    except (ValueError, KeyError, TypeError):
        raise DecryptionError("encrypted file header is malformed") from None
    return header, hashlib.sha256(raw).digest(), start + length


def iter_decrypted(data: bytes | memoryview, data_key: bytes, filename: str) -> Iterator[bytes]:
    """Plaintext chunks of an encrypted file already in memory (or mmapped)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    view = memoryview(data)
    header, digest, offset = _header(view)
    chunk, size = int(header["chunk_size"]), int(header["size"])
    prefix = bytes.fromhex(header["nonce_prefix"])
    count = max(1, -(-size // chunk))
    if len(view) - offset != size + count * TAG:
        raise DecryptionError(f"{filename} is truncated or has extra bytes")
    aead = AESGCM(data_key)
    for index in range(count):
        n = min(chunk, size - index * chunk) + TAG
        try:
            yield aead.decrypt(_nonce(prefix, index), view[offset:offset + n],
                               _aad(digest, index, index == count - 1))
        except InvalidTag:
            raise DecryptionError(f"{filename} does not decrypt (tampered or wrong key)"
                                  ) from None
        offset += n


def decrypt_bytes(data: bytes, data_key: bytes, filename: str) -> bytes:
    return b"".join(iter_decrypted(data, data_key, filename))


def master_key(sec: Any, env_override: str | None = None) -> bytes:
    env = env_override or sec.raw.get("master_key_env") or DEFAULT_MASTER_ENV
    path = sec.raw.get("master_key_file")
    if not path or os.environ.get(env):
        return _check_master(read_key_material("master key", env, None))
    import base64

    return _check_master(base64.b64decode(read_key_material("master key", None, path).strip()))


def is_encrypted(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def dek_path(path: Path) -> Path:
    return path.with_name(path.name + ".dek")


def opens_with(dek: Path, master: bytes) -> bool:
    """Whether the sidecar ``dek`` unwraps with ``master`` (missing or malformed: no)."""
    try:
        unwrap_key(master, json.loads(dek.read_text()), dek.name[:-len(".dek")])
    except (OSError, ValueError, DecryptionError):
        return False
    return True


def encrypt_file(path: Path, master: bytes, chunk_size: int = DEFAULT_CHUNK) -> None:
    """Encrypt ``path`` in place (atomically) and write its ``.dek`` sidecar.

    The sidecar lands before the ciphertext: a kill in between leaves the plaintext with
    an unused sidecar, which a rerun replaces.
    """
    from plugins.atomic_files import atomic_file, write_atomically  # (not a cold start's)

    if is_encrypted(path):
        raise ConfigError(f"{path.name} is already encrypted")
    data_key = os.urandom(32)
    with atomic_file(path) as dst, open(path, "rb") as src:
        encrypt_stream(src, dst, path.stat().st_size, data_key, path.name, chunk_size)
        write_atomically(dek_path(path), json.dumps(wrap_key(master, data_key, path.name)),
                         mode=0o600)


def rotate_file(dek_path: Path, old: bytes, new: bytes) -> None:
    """Rewrap one data key from ``old`` to ``new`` master key; data is untouched."""
    from plugins.atomic_files import write_atomically

    filename = dek_path.name[:-len(".dek")]
    data_key = unwrap_key(old, json.loads(dek_path.read_text()), filename)
    write_atomically(dek_path, json.dumps(wrap_key(new, data_key, filename)), mode=0o600)


@hookimpl(tryfirst=True)
def shardserve_transform_model_bytes(model: str, version: str, filename: str, data: bytes,
                                     config: Any) -> bytes | None:
    sec = settings(config)
    if not data.startswith(MAGIC):
        if sec.raw.get("require_encrypted", False):
            raise ModelLoadError(f"model {model!r} version {version}: {filename} is not "
                                 "encrypted and require_encrypted is set")
        return None
    dek_path = Path(config.repository) / model / version / (filename + ".dek")
    try:
        doc = json.loads(dek_path.read_text())
        data_key = unwrap_key(master_key(sec), doc, Path(filename).name)
        return decrypt_bytes(data, data_key, filename)
    except (OSError, ValueError):
        raise ModelLoadError(f"model {model!r} version {version}: the data key of {filename} "
                             "is missing or malformed") from None
    except ConfigError as exc:
        raise ModelLoadError(f"model {model!r} version {version}: {filename} is encrypted "
                             f"but {exc.message}") from None
    except DecryptionError as exc:
        raise ModelLoadError(f"model {model!r} version {version}: {exc}") from None


# CLI ------------------------------------------------------------------------


def _targets(model_dir: Path, pattern: str) -> list[Path]:
    """Files to work on, outside hidden (staging) directories, after sweeping the temp
    files a killed run left beside them."""
    from plugins.atomic_files import remove_stale, temp_prefix

    found = []
    for path in sorted(model_dir.rglob(pattern)):
        if any(part.startswith(".") for part in path.relative_to(model_dir).parts):
            continue
        if path.is_file() and not path.is_symlink():
            found.append(path)
    for path in found:
        for name in (path.name, dek_path(path).name, path.name[:-len(".dek")]):
            remove_stale(path.parent, temp_prefix(name), ".tmp")
    return found


def _cli_master(args: argparse.Namespace, env_name: str, file_arg: str | None) -> bytes:
    if file_arg:
        import base64

        return _check_master(base64.b64decode(Path(file_arg).read_bytes().strip()))
    return _check_master(read_key_material("master key", env_name, None))


def cmd_encrypt(args: argparse.Namespace) -> int:
    """Encrypt every plaintext model file; files already encrypted under this master key
    (an earlier, possibly interrupted run) are skipped, so a rerun finishes the job."""
    master = _cli_master(args, DEFAULT_MASTER_ENV, args.master_key_file)
    failed = 0
    for path in _targets(Path(args.model_dir), "*.onnx"):
        if not is_encrypted(path):
            encrypt_file(path, master, args.chunk_size)
            print(f"encrypted {path}")
        elif opens_with(dek_path(path), master):
            print(f"already encrypted {path}")
        else:
            failed += 1
            print(f"FAILED {path}: encrypted, but its data key does not open with this "
                  "master key")
    return 1 if failed else 0


def rotation_journal(model_dir: Path) -> Path:
    return model_dir / ".shardserve-rotate.json"


def cmd_rotate(args: argparse.Namespace) -> int:
    """Rewrap every data key under the new master key; resumable and idempotent.

    A journal names the rotation (old and new key ids) until it is complete, so a rerun
    resumes it and a rotation to a third key is refused until then. Keys that already open
    with the new master are skipped. Success is reported only when every encrypted file's
    data key opens with the new master.
    """
    old = _cli_master(args, "SHARDSERVE_OLD_MASTER_KEY", args.old_key_file)
    new = _cli_master(args, DEFAULT_MASTER_ENV, args.new_key_file)
    model_dir = Path(args.model_dir)
    journal = rotation_journal(model_dir)
    target = {"from": master_key_id(old), "to": master_key_id(new)}
    try:
        pending = json.loads(journal.read_text())
    except (OSError, ValueError):
        pending = None
    if isinstance(pending, dict) and pending.get("to") not in (None, target["to"]):
        print(f"FAILED: an interrupted rotation to master key {pending.get('to')} is pending; "
              "rerun it with that new key first")
        return 1
    if pending:
        print(f"resuming the interrupted rotation to master key {target['to']}")
    from plugins.atomic_files import remove_stale, temp_prefix, write_atomically

    remove_stale(model_dir, temp_prefix(journal.name), ".tmp")
    write_atomically(journal, json.dumps(target), mode=0o600)
    failed: set[Path] = set()
    for dek in _targets(model_dir, "*.dek"):
        if opens_with(dek, new):
            print(f"already rewrapped {dek}")
            continue
        try:
            rotate_file(dek, old, new)
        except (DecryptionError, OSError, ValueError) as exc:
            failed.add(dek)
            reason = exc if isinstance(exc, DecryptionError) else "unreadable data key"
            print(f"FAILED {dek}: {reason}")
            continue
        print(f"rewrapped {dek}")
    for path in _targets(model_dir, "*.onnx"):  # the final word: does everything open?
        if is_encrypted(path) and not opens_with(dek_path(path), new):
            if dek_path(path) not in failed:
                print(f"FAILED {path}: does not open with the new master key")
            failed.add(dek_path(path))
    if failed:
        print(f"rotation incomplete: {len(failed)} file(s) do not open with the new master key; "
              "keep the old key")
        return 1
    journal.unlink(missing_ok=True)
    print("rotation complete: every encrypted file opens with the new master key")
    return 0


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("encrypt", help="encrypt every .onnx file under a directory")
    p.add_argument("model_dir")
    p.add_argument("--master-key-file", help=f"base64 key file (default: ${DEFAULT_MASTER_ENV})")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="bytes per GCM chunk")
    p.set_defaults(func=cmd_encrypt)
    p = subparsers.add_parser("rotate", help="rewrap data keys under a new master key")
    p.add_argument("model_dir")
    p.add_argument("--old-key-file", help="default: $SHARDSERVE_OLD_MASTER_KEY")
    p.add_argument("--new-key-file", help=f"default: ${DEFAULT_MASTER_ENV}")
    p.set_defaults(func=cmd_rotate)
