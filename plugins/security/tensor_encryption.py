"""AES-256-GCM for tensors crossing the network between shards.

Registered as the tensor transform ``aes-gcm``; executors apply the chain on
every hop. The request id and the shard name (and the tensor name when the
context has one) are the associated data, so a ciphertext taken from one
request or shard fails to decrypt in any other. The 32-byte key is shared by
the shards of a deployment::

    [security.tensors]
    key_env = "SHARDSERVE_TENSOR_KEY"   # base64; or key_file = "..."

Wire format: version byte 1 | 12-byte random nonce | ciphertext | 16-byte tag.
"""

from __future__ import annotations

import os
from typing import Any

from runtime import hookimpl
from runtime.errors import BadRequest, ConfigError

from .settings import read_key_material, settings

NAME = "aes-gcm"
VERSION = b"\x01"
NONCE = 12


def associated_data(context: dict) -> bytes:
    """request id, shard and tensor, length-prefixed so no two contexts collide."""
    parts = []
    for key in ("request_id", "shard", "tensor"):
        value = str(context.get(key) or "").encode()
        parts.append(len(value).to_bytes(4, "big") + value)
    if not context.get("request_id") or not context.get("shard"):
        raise BadRequest("tensor encryption needs a request id and a shard name")
    return b"shardserve-tensor-v1" + b"".join(parts)


class TensorEncryption:
    """``encode``/``decode`` one tensor's bytes for one request and shard."""

    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != 32:
            raise ConfigError("the tensor encryption key must be 32 bytes")
        self._aead = AESGCM(key)

    def encode(self, data: Any, context: dict) -> bytes:
        if hasattr(data, "tobytes"):
            data = data.tobytes()
        nonce = os.urandom(NONCE)  # the kernel's: never repeats across SnapStart copies
        return VERSION + nonce + self._aead.encrypt(nonce, bytes(data), associated_data(context))

    def decode(self, data: bytes, context: dict) -> bytes:
        from cryptography.exceptions import InvalidTag

        view = memoryview(data)
        if len(view) < 1 + NONCE + 16 or view[:1] != VERSION:
            raise BadRequest("encrypted tensor is malformed")
        try:
            return self._aead.decrypt(bytes(view[1:1 + NONCE]), view[1 + NONCE:],
                                      associated_data(context))
        except InvalidTag:
            raise BadRequest("encrypted tensor does not authenticate for this request and "
                             "shard") from None


def from_config(config: Any) -> TensorEncryption:
    section = settings(config).section("tensors")
    return TensorEncryption(read_key_material("tensor encryption key",
                                              section.get("key_env", "SHARDSERVE_TENSOR_KEY"),
                                              section.get("key_file")))


@hookimpl(tryfirst=True)
def shardserve_register_tensor_transforms(register: Any) -> None:
    register(NAME, from_config)
