"""Label vocabularies of the NIH ChestX-ray14 release and of the models we load.

The order of ``CHEXNET_LABELS`` is the CheXNet (Rajpurkar et al. 2017) output order; every label
vector, classifier row and per-label metric in this project uses it.
"""

from __future__ import annotations

__all__ = ["CHEXNET_LABELS", "NO_FINDING", "XRV_LABELS", "NUM_LABELS", "label_index"]

CHEXNET_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_LABELS = len(CHEXNET_LABELS)

#: The string the NIH CSV uses for an image with none of the 14 findings.
NO_FINDING = "No Finding"

#: Output order of torchxrayvision's DenseNet121 ("densenet121-res224-all"): 18 outputs.
XRV_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)

_INDEX = {name: i for i, name in enumerate(CHEXNET_LABELS)}


def label_index(name: str) -> int:
    """Index of ``name`` in :data:`CHEXNET_LABELS`; raises ``KeyError`` naming the valid labels."""
    try:
        return _INDEX[name]
    except KeyError:
        raise KeyError(f"Unknown label {name!r}; expected one of {', '.join(CHEXNET_LABELS)}") from None
