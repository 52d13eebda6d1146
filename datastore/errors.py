"""The datastore's error hierarchy: etcd and gRPC failures are translated into these at the client boundary."""


class DatastoreError(Exception):
    """Any failure talking to the datastore."""


class Unavailable(DatastoreError):
    """etcd could not be reached or did not answer in time. Retryable."""


class TimedOut(Unavailable):
    """A call got no answer within its deadline (the member may be hung, partitioned or only slow). Retryable."""


class Stalled(Unavailable):
    """A watch stream stopped answering progress requests: its member is hung or cut off. Retryable elsewhere."""


class CasConflict(DatastoreError):
    """A compare-and-swap (or create-only write) lost: someone else changed the key first."""


class AlreadyExists(CasConflict):
    """A create-only write found the key already there."""


class NotFound(DatastoreError):
    """The key does not exist."""


class Compacted(DatastoreError):
    """The requested revision is no longer in etcd's history; the caller must take a new snapshot."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (history starts at {compact_revision})")
        self.compact_revision = compact_revision


class LeaseLost(DatastoreError):
    """A lease expired or was revoked; keys bound to it are gone."""
