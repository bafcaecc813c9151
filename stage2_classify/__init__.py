"""Stage 2: per-vertebra fracture classifier on stage-1 crops, patient aggregation and OOF
evaluation (``python -m stage2_classify``; see docs/stage2.md). The submission runs through the
test-time engine (:mod:`cspine.submit`)."""
