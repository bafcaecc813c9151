"""Stage 2: per-vertebra fracture classifier on stage-1 crops, patient aggregation, OOF
evaluation and submission (``python -m stage2_classify``; see docs/stage2.md)."""
