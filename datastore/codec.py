"""Decode a stored key + value into its typed model, and encode a model for storage. Pure: no I/O.

A value that is not JSON, does not validate, or disagrees with its own key raises ``ModelError``; watchers log it
with the key and treat the key as missing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from datastore import keys as k
from datastore import model as m
from datastore.fields import JsonObject, ModelError

Model = (
    m.ClusterConfig
    | m.BGPPeer
    | m.IPPool
    | m.Block
    | m.Affinity
    | m.Handle
    | m.Node
    | m.Pod
    | m.Namespace
    | m.Policy
    | m.Endpoint
    | m.RouteStatus
    | m.BGPPeerStatus
    | m.AgentStatus
)

T = TypeVar("T")

_PARSERS: dict[type[k.Key], Callable[[JsonObject], Model]] = {
    k.ClusterConfigKey: m.ClusterConfig.from_json,
    k.BGPPeerKey: m.BGPPeer.from_json,
    k.PoolKey: m.IPPool.from_json,
    k.BlockKey: m.Block.from_json,
    k.AffinityKey: m.Affinity.from_json,
    k.HandleKey: m.Handle.from_json,
    k.NodeKey: m.Node.from_json,
    k.PodKey: m.Pod.from_json,
    k.NamespaceKey: m.Namespace.from_json,
    k.PolicyKey: m.Policy.from_json,
    k.EndpointKey: m.Endpoint.from_json,
    k.RouteKey: m.RouteStatus.from_json,
    k.BGPPeerStatusKey: m.BGPPeerStatus.from_json,
    k.AgentStatusKey: m.AgentStatus.from_json,
}


def key_of(value: Model) -> k.Key:
    """The key a model value is stored under."""
    match value:
        case m.ClusterConfig():
            return k.ClusterConfigKey()
        case m.BGPPeer():
            return k.BGPPeerKey(value.name)
        case m.IPPool():
            return k.PoolKey(value.cidr)
        case m.Block():
            return k.BlockKey(value.cidr)
        case m.Affinity():
            return k.AffinityKey(value.node, value.cidr)
        case m.Handle():
            return k.HandleKey(value.handle)
        case m.Node():
            return k.NodeKey(value.name)
        case m.Pod():
            return k.PodKey(value.namespace, value.name)
        case m.Namespace():
            return k.NamespaceKey(value.name)
        case m.Policy():
            return k.PolicyKey(value.namespace, value.name)
        case m.Endpoint():
            return k.EndpointKey(value.node, value.namespace, value.pod, value.iface)
        case m.RouteStatus():
            return k.RouteKey(value.node, value.cidr)
        case m.BGPPeerStatus():
            return k.BGPPeerStatusKey(value.node, value.peer_ip)
        case m.AgentStatus():
            return k.AgentStatusKey(value.node)
    raise TypeError(f"not a podnet model: {type(value).__name__}")


def encode(value: Model) -> bytes:
    return json.dumps(value.to_json(), sort_keys=True, separators=(",", ":")).encode()


def decode(path: str, raw: bytes) -> tuple[k.Key, Model]:
    """Parse ``raw`` stored at ``path``. Raises ``ModelError`` (or ``keys.InvalidKey``) with the reason."""
    key = k.parse_key(path)
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"expected a JSON object, got {type(data).__name__}")
    try:
        value = _PARSERS[type(key)](data)
    except ModelError:
        raise
    except ValueError as exc:  # from a model's own consistency checks
        raise ModelError(str(exc)) from None
    if key_of(value) != key:
        raise ModelError(f"value names {key_of(value).path}, but is stored at {path}")
    return key, value


def decode_as(path: str, raw: bytes, cls: type[T]) -> T:
    """``decode`` and check the model type (for callers that read one known key)."""
    _, value = decode(path, raw)
    if not isinstance(value, cls):
        raise ModelError(f"{path} holds a {type(value).__name__}, expected {cls.__name__}")
    return value
