"""Stage 1: segment C1–C7 with a MONAI 3D network, then cut one crop per vertebra.

Pipeline (each step reads and writes files under ``$WORK/stage1/``):

1. :mod:`stage1_segment.prepare` — DICOM → HU (and mask) on the model grid, cached per study.
2. ``python -m stage1_segment fit`` — LightningCLI training (:mod:`.module`, :mod:`.data`).
3. prediction, boxes and crops run through the one test-time engine (:mod:`cspine.engine`)
   with this package's parts: :mod:`.inference`, :mod:`.boxes`, :mod:`.crops`.

Axis order and world frame are those of :mod:`common.geometry`: arrays (X, Y, Z), tensors
(C, X, Y, Z), affines voxel → RAS mm.
"""
