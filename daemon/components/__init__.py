"""The parts ``podnet-agent`` is made of, each a ``daemon.component.Component`` around one agent object: the
datastore (one watch and cache for all), the policy writer, the router (routes, devices, BGP), the CNI server and
the status publisher."""
