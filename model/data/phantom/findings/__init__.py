"""The 14 findings, each drawn as its own image pattern at an anatomically plausible place.

A finding is a *plan* (:data:`~model.data.phantom.findings.common.FindingPlan`): it draws every
random number of one instance (geometry from the patient-level stream, so a finding that recurs in
a patient reappears in the same place; jitter from the image-level stream), may change the anatomy
(a bigger heart, a raised hemidiaphragm), and returns a ``draw(ctx)`` closure that paints it into
the :class:`~model.data.phantom.context.RenderContext`. The renderer looks plans up in the explicit
table :data:`model.data.phantom.findings.table.PLANS`. One module per family of findings:
``cardiac`` (Cardiomegaly, Hernia), ``pleural`` (Effusion, Pneumothorax, Pleural_Thickening),
``focal`` (Mass, Nodule, Atelectasis), ``airspace`` (Infiltration, Pneumonia, Consolidation, Edema)
and ``chronic`` (Emphysema, Fibrosis); shared sampling helpers live in ``common``.
"""
