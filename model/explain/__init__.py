"""Why the model says what it says: Grad-CAM and anatomical regions (``gradcam``), polarized
classifier channels and label co-occurrence (``channels``), and the per-image evidence of the
clinical report (``evidence``). Import the modules by their full path.
"""
