"""The explicit table from finding name (CheXNet order) to its plan; the renderer's only entry to findings."""

from __future__ import annotations

from model.data.phantom.findings.airspace import plan_consolidation, plan_edema, plan_infiltration, plan_pneumonia
from model.data.phantom.findings.cardiac import plan_cardiomegaly, plan_hernia
from model.data.phantom.findings.chronic import plan_emphysema, plan_fibrosis
from model.data.phantom.findings.common import FindingPlan
from model.data.phantom.findings.focal import plan_atelectasis, plan_round
from model.data.phantom.findings.pleural import plan_effusion, plan_pleural_thickening, plan_pneumothorax
from model.labels import CHEXNET_LABELS

PLANS: dict[str, FindingPlan] = {
    "Atelectasis": plan_atelectasis,
    "Cardiomegaly": plan_cardiomegaly,
    "Effusion": plan_effusion,
    "Infiltration": plan_infiltration,
    "Mass": plan_round("Mass", (1, 1), (0.045, 0.11), 0.45),
    "Nodule": plan_round("Nodule", (1, 3), (0.015, 0.035), 0.3),
    "Pneumonia": plan_pneumonia,
    "Pneumothorax": plan_pneumothorax,
    "Consolidation": plan_consolidation,
    "Edema": plan_edema,
    "Emphysema": plan_emphysema,
    "Fibrosis": plan_fibrosis,
    "Pleural_Thickening": plan_pleural_thickening,
    "Hernia": plan_hernia,
}
assert tuple(PLANS) == CHEXNET_LABELS
