"""BGP: ExaBGP configuration, supervision, the API bridge, and the learned-route RIB."""
