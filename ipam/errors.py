"""IPAM's named errors. Each carries a message an operator can act on."""

from __future__ import annotations


class IpamError(Exception):
    """Any IPAM failure."""


class InvalidRequest(IpamError):
    """Bad input (an address outside every pool, a malformed CIDR, an overlapping pool)."""


class PoolOverlap(InvalidRequest):
    """A new pool overlaps an existing one."""


class NoPool(IpamError):
    """No enabled pool is available to this node (none configured, all disabled, or selectors exclude it)."""


class PoolExhausted(IpamError):
    """No free address: every block is full, and borrowing was either impossible or forbidden (strict affinity)."""


class AddressInUse(IpamError):
    """A specifically requested address is already allocated to another holder."""


class TooManyConflicts(IpamError):
    """Compare-and-swap kept losing to concurrent writers; the caller may retry later."""


class PoolInUse(IpamError):
    """A pool cannot be deleted while addresses in it are allocated."""
