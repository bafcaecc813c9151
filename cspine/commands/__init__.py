"""Sub-commands of ``cspine``; see :mod:`cspine.cli` for the module contract."""
