"""HTML reports: the regulator's run report and the per-image clinical report.

Each report is collect → figures → HTML, kept apart (``run_report`` / ``run_figures``;
:mod:`model.explain.evidence` / ``clinical_figures`` / ``clinical``); :mod:`engine.reports.html`
holds what they share. Import the modules by their full path.
"""
