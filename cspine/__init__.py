"""The ``cspine`` command line and the end-to-end tools (predict one study, report)."""
