"""podnet's datastore layer: the only package that knows the etcd key layout and talks to etcd."""
