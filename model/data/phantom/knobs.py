"""The phantom generator's difficulty knobs, read at call time (set them here, e.g. in a tuning script).

``bench/phantom_difficulty.py`` measures what they do. :mod:`model.data.phantom` re-exports their
default values for reading; the renderer reads them from this module, so a change must be made here
(``model.data.phantom.knobs.SUBTLE_SHARE = 0.0``), not on the package.
"""

from __future__ import annotations

#: Global multiplier on every finding's strength (opacity, size change, air change). 1.3 is the
#: calibrated default (see ``bench/phantom_difficulty.py``); lower is fainter (harder), higher easier.
LESION_CONTRAST: float = 1.3
#: Share of finding instances drawn in the subtle range (a strength of 0.08..0.35 of the full one
#: instead of 0.35..1.0). Subtle instances are what keeps the task from being trivial.
SUBTLE_SHARE: float = 0.3
#: Standard deviation of the per-pixel Gaussian noise on the 0..1 output scale, before the
#: per-image factor (0.6..1.6; AP views a third more). Noise hides nodules and faint textures.
NOISE_LEVEL: float = 0.012
#: Scale of the between-patient anatomy variation (heart size, lung shape, diaphragm height).
#: Natural variation overlapping the finding changes (e.g. heart size vs. Cardiomegaly) is the other
#: source of difficulty.
ANATOMY_VARIATION: float = 1.0
#: Most images one phantom patient gets (NIH has up to 184); see ``writer._max_followups``.
MAX_FOLLOWUPS: int = 10
