"""Examples built on the public API of :mod:`bilevel` (``import bilevel as bl``)."""
