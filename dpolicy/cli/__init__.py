"""Thin command-line entry points. No logic here that the library cannot do without them."""
