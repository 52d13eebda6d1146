"""Typed reads and writes of podnet models: keys come from the model (``codec.key_of``), never from the caller.

Reads treat a malformed value as missing (logged with its key), as the watcher does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from datastore import codec
from datastore.etcd import EtcdClient
from datastore.fields import ModelError
from datastore.keys import InvalidKey, Key

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Versioned(Generic[T]):
    value: T
    mod_revision: int
    path: str


class Store:
    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    def get(self, key: Key, cls: type[T]) -> Versioned[T] | None:
        kv = self.client.get(key.path)
        if kv is None:
            return None
        try:
            value = codec.decode_as(kv.key, kv.value, cls)
        except (ModelError, InvalidKey) as exc:
            log.warning("treating malformed value at %s as missing: %s", kv.key, exc)
            return None
        return Versioned(value, kv.mod_revision, kv.key)

    def list(self, prefix: str, cls: type[T], revision: int = 0) -> list[Versioned[T]]:
        kvs, _ = self.client.get_prefix(prefix, revision)
        out: list[Versioned[T]] = []
        for kv in kvs:
            try:
                out.append(Versioned(codec.decode_as(kv.key, kv.value, cls), kv.mod_revision, kv.key))
            except (ModelError, InvalidKey) as exc:
                log.warning("skipping malformed value at %s: %s", kv.key, exc)
        return out

    def put(self, value: codec.Model, lease: int = 0) -> int:
        return self.client.put(codec.key_of(value).path, codec.encode(value), lease)

    def create(self, value: codec.Model, lease: int = 0) -> int:
        """Create-only; raises ``AlreadyExists``."""
        return self.client.create(codec.key_of(value).path, codec.encode(value), lease)

    def cas(self, value: codec.Model, mod_revision: int, lease: int = 0) -> int:
        """Write if unchanged since ``mod_revision`` (0: absent); raises ``CasConflict``."""
        return self.client.cas(codec.key_of(value).path, codec.encode(value), mod_revision, lease)

    def delete(self, key: Key, mod_revision: int | None = None) -> bool:
        return self.client.delete(key.path, mod_revision)
