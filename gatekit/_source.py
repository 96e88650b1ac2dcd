"""The attribute that records how a model was built, read by conversion, shape propagation and saving.

The lowest layer of gatekit: ``gatekit.adapters`` sets it, and modules far below ``gatekit.convert``
read it, so it lives where every one of them may import it.
"""

# Set by gatekit.adapters.get_model on the models it builds: (name, kwargs), for gatekit.save.
SOURCE_ATTRIBUTE = "gatekit_source"
