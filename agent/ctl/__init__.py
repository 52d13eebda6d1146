"""podnet ctl package."""
