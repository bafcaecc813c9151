"""Shared, Lightning-free logic for cspine: DICOM/NIfTI I/O, geometry, labels, index, folds, metric."""
