"""Synthetic cervical-spine CT datasets in the exact RSNA 2022 layout (``cspine synth``).

``generate(out_dir, preset="tiny"|"demo"|"full", seed=0, **overrides) -> Path`` writes
train/test DICOM series of a neck phantom (vertebrae C1..T4 with cortex, cancellous bone,
posterior arches and discs, soft tissue, airway), cracks and displaced fragments on the positive
vertebrae, NIfTI masks stored like RSNA's, and the CSVs. See ``docs/synth.md``.
"""

from common.synth.dataset import SynthStateError, generate, load_config, rerender
from common.synth.presets import PRESETS, SynthConfig, make_config

__all__ = ["generate", "rerender", "load_config", "make_config", "PRESETS", "SynthConfig",
           "SynthStateError"]
