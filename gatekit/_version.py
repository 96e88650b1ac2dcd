"""gatekit's version, apart from the package's ``__init__`` so that modules it imports may read it."""

__version__ = "0.1.0"
