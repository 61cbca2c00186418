"""Small shared helpers: seeding and device selection."""

from dpolicy.utils.seeding import seed_everything, resolve_device  # noqa: F401
