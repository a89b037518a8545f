"""Model backends, one interface per role (see interfaces.py), built from a profile by factory.py."""
