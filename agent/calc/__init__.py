"""Pure calculation: desired dataplane state as a function of a datastore snapshot. No I/O, no clock."""
