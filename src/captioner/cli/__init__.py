"""The ``captioner`` command line."""
