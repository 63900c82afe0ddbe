"""The compression section of bench/RESULTS.md: ours against torch-pruning, fidelity and CPU speed.

Per dataset one table (parameters, FLOPs, mean/max |Δlogit|, decision flips, AUROC change, whether
the issue's goals are met, speed-up at 64 and 224 px, batch 1 and 32) beside the paper's row, then
the 64 px batch-1 profile and the operator floor (each model beside its one-channel skeleton), which
say whether batch 1 is bound by operator overhead.
"""

from __future__ import annotations

from typing import Any

from render_format import DASH, _num, arrow, fmt, fmt_params, fmt_pct, fmt_s, table

__all__ = ["PAPER_COMPRESSION", "section_compress"]

#: The paper's compression result (DenseNet121, 224 px).
PAPER_COMPRESSION = {"params_before": 6.97e6, "params_after": 3.38e6, "param_reduction": 0.5143,
                     "max_abs_dlogit": "< 5e-6", "mean_auroc_delta": "+0.0003",
                     "latency_before_ms": 16.07, "latency_after_ms": 15.54}


_SPEED_KEYS = (("64px_b1", "×64 px b1"), ("64px_b32", "×64 px b32"), ("224px_b1", "×224 px b1"),
               ("224px_b32", "×224 px b32"))


def _compress_rows(res: dict[str, Any], p0: float | None) -> list[tuple[Any, ...]]:
    rows = []
    for r in res.get("rows") or []:
        if not isinstance(r, dict):
            continue
        red = _num(r.get("param_reduction"))
        after = p0 * (1 - red) if p0 is not None and red is not None else None
        sp = r.get("speedup") if isinstance(r.get("speedup"), dict) else {}
        rows.append((r.get("method", DASH), arrow(fmt_params(p0), fmt_params(after)),
                     fmt_pct(red, ".2f", "−"), fmt_pct(r.get("flop_reduction"), ".1f", "−"),
                     fmt(r.get("mean_abs_dlogit"), ".3f"), fmt(r.get("max_abs_dlogit"), ".2g"),
                     fmt_pct(r.get("flip_rate"), ".2f"), fmt(r.get("mean_auroc_delta"), "+.4f"),
                     _worst(r), {True: "yes", False: "no"}.get(r.get("meets"), DASH),
                     *(fmt(sp.get(k), ".2f") for k, _ in _SPEED_KEYS), fmt_s(r.get("seconds"))))
    return rows


def _worst(r: dict[str, Any]) -> str:
    """The worst label's |ΔAUROC|, with its name and positives where the JSON has them."""
    w = r.get("worst_label") if isinstance(r.get("worst_label"), dict) else None
    text = fmt(r.get("worst_abs_auroc_delta"), ".4f")
    if w is None:
        return text
    return f"{text} ({w.get('label', '?')}, {fmt(w.get('positives'), ',.0f')} pos.)"


def _compress_profile(res: dict[str, Any]) -> list[str]:
    prof = res.get("profile_64px_b1") if isinstance(res.get("profile_64px_b1"), dict) else {}
    lines = []
    for name, p in prof.items():
        if not isinstance(p, dict):
            continue
        top = ", ".join(f"{t.get('op')} {fmt_pct(t.get('share'), '.0f')}" for t in (p.get("top") or [])[:4]
                        if isinstance(t, dict))
        lines.append(f"- {name}: {fmt(p.get('ops_per_forward'), ',.0f')} operator calls per forward pass, "
                     f"{fmt(p.get('ms_per_forward'), '.1f')} ms under the profiler, convolutions "
                     f"{fmt_pct(p.get('conv_share'), '.0f')} of the time ({top})")
    return (["Profile at 64 px, batch 1 (torch.profiler self CPU time):", ""] + lines + [""]) if lines else []


def _compress_floor(res: dict[str, Any]) -> list[str]:
    """The operator-floor table: how much of a batch-1 pass is per-call overhead pruning cannot cut."""
    floors = res.get("operator_floor") if isinstance(res.get("operator_floor"), dict) else {}
    rows = []
    for setting, per_model in floors.items():
        if not isinstance(per_model, dict):
            continue
        for name, f in per_model.items():
            if not isinstance(f, dict):
                continue
            ms = {k: (_num(f.get(k)) or 0.0) * 1000 for k in ("time_s", "floor_s", "arithmetic_s")}
            need = f.get("needed_arithmetic_speedup_for_1.3")
            rows.append((setting.replace("px_b", " px, batch "), name, f"{ms['time_s']:.2f}",
                         f"{ms['floor_s']:.2f} ({fmt_pct(f.get('floor_share'), '.0f')})", f"{ms['arithmetic_s']:.2f}",
                         fmt(f.get("speedup"), ".2f"), fmt(f.get("arithmetic_speedup"), ".2f"),
                         fmt(need, ".2f") if need is not None else "unreachable"))
    if not rows:
        return []
    head = ("Setting", "Model", "ms", "floor ms (share)", "arithmetic ms", "× whole", "× arithmetic",
            "× arithmetic needed for ×1.3")
    return ["Operator floor (bench/operator_floor.py): each model beside its skeleton -- the same operator graph with "
            "one channel per dense layer (two per block input), timed interleaved with it -- so floor = per-call "
            "overhead no pruning removes, "
            "arithmetic = time − floor; the last column is the arithmetic speed-up (parent's over this model's) "
            "that a ×1.3 whole-pass speed-up would need with this model's floor.", ""] + table(head, rows) + [""]


def section_compress(data: dict[str, Any]) -> list[str]:
    results = data.get("results") if isinstance(data.get("results"), list) else []
    p = PAPER_COMPRESSION
    lines = [f"Scored on each dataset's held-out test split; CPU speed with {data.get('threads', DASH)} thread(s), "
             "parent and compressed models timed A/B interleaved in the same run (medians); speed-up = parent time / "
             "model time. \"meets\" = the issue's fidelity goals: phantoms mean |Δlogit| ≤ 0.02, flips ≤ 0.5 %, "
             "|mean ΔAUROC| ≤ 0.001 and every label ≤ 0.005; NIH sample mean |Δlogit| ≤ 0.03, flips ≤ 1 %.", ""]
    paper_row = ("**paper** (DenseNet121, 224 px)",
                 arrow(fmt_params(p["params_before"]), fmt_params(p["params_after"])),
                 fmt_pct(p["param_reduction"], ".2f", "−"), DASH, DASH, p["max_abs_dlogit"], DASH,
                 p["mean_auroc_delta"], DASH, DASH, DASH, DASH,
                 f"{p['latency_before_ms'] / p['latency_after_ms']:.2f} ({p['latency_before_ms']:.2f} → "
                 f"{p['latency_after_ms']:.2f} ms)", DASH, DASH)
    headers = ("Method", "Parameters", "Params −", "FLOPs −", "mean |Δlogit|", "max |Δlogit|", "Flips",
               "Δ mean AUROC", "worst |ΔAUROC|", "Meets", *(h for _, h in _SPEED_KEYS), "Time")
    if not results:
        return lines + table(headers, [paper_row]) + ["", "(no datasets in the JSON)"]
    for res in results:
        if not isinstance(res, dict):
            continue
        sm = res.get("summary") or {}
        p0 = _num(sm.get("parent_parameters"))
        lines += [f"### {res.get('dataset', '?')}", "",
                  f"Parent: {fmt_params(p0)} parameters, mean AUROC {fmt(sm.get('parent_mean_auroc_test'))} on "
                  f"{fmt(sm.get('test_images'), ',.0f')} test images ({fmt(sm.get('calibration_images'), ',.0f')} "
                  f"calibration images). Exact (lossless) stage: {fmt_pct(sm.get('exact_reduction'), '.1f', '−')}.",
                  ""]
        lines += table(headers, [paper_row] + _compress_rows(res, p0)) + [""]
        lines += _compress_profile(res)
        lines += _compress_floor(res)
    return lines[:-1] if lines and lines[-1] == "" else lines
