"""Procedural chest radiograph phantoms in the NIH ChestX-ray14 on-disk layout.

The project may not ship real X-rays, so its embedded default data set is rendered here: PA chest
radiograph phantoms whose labels follow the real NIH joint label distribution (shipped as figures in
``model/resources/nih_label_combinations.json``) and whose 14 findings are each drawn as their own
image pattern at an anatomically plausible place. The files are written exactly as the NIH release
lays them out (``Data_Entry_2017_v2020.csv``, ``images/``, ``train_val_list.txt``,
``test_list.txt``), so the one NIH reader serves both phantoms and real data.

Geometry is computed in a *canonical frame*: normalised NIH image coordinates ``(u, v)`` in 0..1,
``u`` to the image right (the patient's left), ``v`` down. NIH radiologist boxes (the optional
``nih_bbox_positions.json``) live in the same frame, so lesion positions are sampled from them
directly. Each image maps its pixel grid into that frame through a per-patient size and a per-image
pose (shift, zoom, rotation of a few degrees), so every shape is a closed-form function of two
coordinate arrays: vectorised numpy, no per-pixel loops.

Randomness: only ``np.random.default_rng``. A rendered image draws independent child streams for
anatomy, acquisition, noise and each finding, so adding or removing one label leaves everything
else in the image unchanged (which is what the tests and any attribution check rely on).

Difficulty knobs are :data:`LESION_CONTRAST`, :data:`SUBTLE_SHARE`, :data:`NOISE_LEVEL` and
:data:`ANATOMY_VARIATION`, read at call time from :mod:`model.data.phantom.knobs` (set them there;
the names here are their values at import).

Modules, bottom up: ``knobs``, ``ramps`` (soft edges), ``checks`` (argument checks), ``nih_stats``
(the shipped NIH tables, label sampling), ``textures`` (noise and vessel banks), ``anatomy``
(patient and shot parameters), ``context`` (the render context and shapes), ``findings/`` (one
module per family of findings, and their table), ``radiograph`` (the base image and exposure),
``render`` (one image) and ``writer`` (the data set). This package re-exports the public names;
its modules import each other directly.
"""

from __future__ import annotations

from model.data.phantom.knobs import ANATOMY_VARIATION, LESION_CONTRAST, MAX_FOLLOWUPS, NOISE_LEVEL, SUBTLE_SHARE
from model.data.phantom.nih_stats import label_table, nih_label_marginals, sample_label_vectors
from model.data.phantom.render import render_phantom
from model.data.phantom.writer import (
    FIELD_OF_VIEW_MM,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    NIH_HEADER,
    generate_phantoms,
)

__all__ = [
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "LESION_CONTRAST",
    "SUBTLE_SHARE",
    "NOISE_LEVEL",
    "ANATOMY_VARIATION",
    "MAX_FOLLOWUPS",
    "NIH_HEADER",
    "FIELD_OF_VIEW_MM",
    "generate_phantoms",
    "render_phantom",
    "sample_label_vectors",
    "label_table",
    "nih_label_marginals",
]
