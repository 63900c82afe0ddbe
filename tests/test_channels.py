"""Polarized classifier channels and label Jaccard: the rule, the categories, the label sources, the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from engine.core.errors import DataError
from model.bundle import new_bundle, save_bundle
from model.explain.channels import (
    LabelStats,
    analyze_channels,
    jaccard_category,
    polarized_channels,
    shipped_label_stats,
)
from model.labels import CHEXNET_LABELS
from model.nets import arch_config, build_model

from conftest import NIH_HEADER, SHARED_DATA

NIH_CSV = SHARED_DATA / "nih_labels" / "Data_Entry_2017_v2020.csv.gz"
L = {name: i for i, name in enumerate(CHEXNET_LABELS)}


def _matrix(groups: list[tuple[tuple[str, ...], int]]) -> np.ndarray:
    rows = []
    for names, count in groups:
        v = np.zeros(len(CHEXNET_LABELS), np.uint8)
        for n in names:
            v[L[n]] = 1
        rows += [v] * count
    return np.stack(rows)


# 10 Atelectasis+Effusion, 5 Atelectasis, 5 Effusion, 10 Cardiomegaly, 1 Atelectasis+Cardiomegaly,
# 10 Hernia, 3 Effusion+Hernia, 20 No Finding.
KNOWN = _matrix([(("Atelectasis", "Effusion"), 10), (("Atelectasis",), 5), (("Effusion",), 5),
                 (("Cardiomegaly",), 10), (("Atelectasis", "Cardiomegaly"), 1), (("Hernia",), 10),
                 (("Effusion", "Hernia"), 3), ((), 20)])


def _known_weights() -> np.ndarray:
    """Planted channels with known label sets; every other weight is 0 (never strong)."""
    w = np.zeros((len(CHEXNET_LABELS), 40))
    plant = {
        0: ({"Cardiomegaly": 1.0}, {"Hernia": -1.0}),                    # J = 0          Perfect
        1: ({"Atelectasis": 1.0}, {"Effusion": -1.0}),                   # J = 10/24      Conflict
        2: ({"Atelectasis": 0.8}, {"Cardiomegaly": -0.9}),               # J = 1/26       Legitimate
        3: ({"Effusion": 0.7}, {"Hernia": -0.6}),                        # J = 3/28       Mixed
        4: ({"Cardiomegaly": 0.5, "Hernia": 0.5}, {"Atelectasis": -0.5}),  # J = 1/39     Legitimate
        5: ({"Atelectasis": 1.0}, {}),                                   # one-sided: not polarized
        6: ({}, {"Effusion": -1.0, "Hernia": -1.0}),                     # one-sided: not polarized
    }
    for c, (pos, neg) in plant.items():
        for name, value in {**pos, **neg}.items():
            w[L[name], c] = value
    return w


def test_polarized_channels_and_categories_on_a_constructed_classifier() -> None:
    stats = LabelStats.from_matrix(KNOWN, CHEXNET_LABELS, "constructed (64 images)")
    result = analyze_channels(_known_weights(), CHEXNET_LABELS, stats, percentile=90)
    by_channel = {ch.channel: ch for ch in result.channels}
    assert set(by_channel) == {0, 1, 2, 3, 4}
    expected = {0: (0.0, "Perfect"), 1: (10 / 24, "Conflict"), 2: (1 / 26, "Legitimate"),
                3: (3 / 28, "Mixed"), 4: (1 / 39, "Legitimate")}
    for c, (j, category) in expected.items():
        assert by_channel[c].jaccard == pytest.approx(j), c
        assert by_channel[c].category == category, c
    assert by_channel[4].positive == ("Cardiomegaly", "Hernia")
    assert by_channel[4].negative == ("Atelectasis",)
    # Pairwise companions: J(Cardiomegaly, Atelectasis) = 1/26, J(Hernia, Atelectasis) = 0.
    assert by_channel[4].mean_pair_jaccard == pytest.approx((1 / 26) / 2)
    assert by_channel[4].max_pair == ("Cardiomegaly", "Atelectasis")
    assert result.category_counts == {"Perfect": 1, "Legitimate": 2, "Mixed": 1, "Conflict": 1, "Undetermined": 0}
    assert result.label_source["source"] == "constructed (64 images)"
    assert result.n_polarized == 5 and result.n_channels == 40


def test_strong_rule_matches_its_definition_on_random_weights() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(14, 200))
    found, thr = polarized_channels(w, percentile=80)
    assert np.allclose(thr, np.percentile(np.abs(w), 80, axis=1))
    strong = np.abs(w) > thr[:, None]
    brute = {c for c in range(200) if (strong[:, c] & (w[:, c] > 0)).any() and (strong[:, c] & (w[:, c] < 0)).any()}
    assert {c for c, *_ in found} == brute
    for c, pos, neg, score in found:
        assert all(w[k, c] > thr[k] for k in pos) and all(w[k, c] < -thr[k] for k in neg)
        assert score == pytest.approx(float((np.abs(w[:, c]) / thr)[strong[:, c]].sum()))
    scores = [s for *_, s in found]
    assert scores == sorted(scores, reverse=True)
    # A higher percentile can only shrink the set.
    fewer, _ = polarized_channels(w, percentile=95)
    assert {c for c, *_ in fewer} <= brute


@pytest.mark.parametrize("j,category", [(0.0, "Perfect"), (1e-9, "Legitimate"), (0.0999, "Legitimate"),
                                        (0.1, "Mixed"), (0.2999, "Mixed"), (0.3, "Conflict"), (1.0, "Conflict"),
                                        (None, "Undetermined"), (float("nan"), "Undetermined")])
def test_category_boundaries(j: float | None, category: str) -> None:
    assert jaccard_category(j) == category


def test_label_sets_absent_from_the_source_are_undetermined() -> None:
    stats = LabelStats.from_matrix(_matrix([(("Atelectasis",), 5), ((), 5)]), CHEXNET_LABELS, "tiny")
    w = np.zeros((14, 10))
    w[L["Hernia"], 0], w[L["Edema"], 0] = 1.0, -1.0
    (ch,) = analyze_channels(w, CHEXNET_LABELS, stats).channels
    assert ch.jaccard is None and ch.category == "Undetermined" and ch.images_either == 0


def test_shipped_nih_statistics() -> None:
    stats = shipped_label_stats()
    assert stats.n_images == 112_120
    assert "112,120" in stats.source
    i, j = L["Hernia"], L["Cardiomegaly"]
    assert int(stats.cooccurrence[i, j]) == 7
    assert stats.pair_jaccard("Hernia", "Cardiomegaly") == pytest.approx(0.0023, abs=5e-5)
    jac = stats.jaccard_matrix()
    off = jac[~np.eye(14, dtype=bool)]
    assert (off > 0).all()  # on all NIH labels no pair is exclusive
    with pytest.raises(DataError, match="pairwise counts only"):
        stats.set_jaccard(["Hernia"], ["Cardiomegaly"])


@pytest.mark.skipif(not NIH_CSV.is_file(), reason="../shared/data/nih_labels not present")
def test_shipped_table_is_derived_from_the_full_nih_csv() -> None:
    stats = LabelStats.from_nih_csv(NIH_CSV)
    assert stats.n_images == 112_120
    assert (stats.cooccurrence == shipped_label_stats().cooccurrence).all()


def test_nih_csv_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv.gz"
    rows = [NIH_HEADER, "a.png,Effusion,0,1,50,M,PA,1,1,0.1,0.1", "b.png,Effusion|Pneumonitis,0,2,50,M,PA,1,1,0.1,0.1"]
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(DataError, match=r"row 3: unknown label 'Pneumonitis'"):
        LabelStats.from_nih_csv(path)
    plain = tmp_path / "labels.csv"
    plain.write_text("\n".join(rows[:2]) + "\n")
    assert LabelStats.from_nih_csv(plain).n_images == 1


def test_cli_analyze_channels_names_its_label_source(tmp_path: Path, nih_factory) -> None:
    torch.manual_seed(0)
    config = arch_config("tiny")
    model = build_model("densenet", config)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(_known_weights()[:, : model.classifier.in_features]).float())
    path = tmp_path / "m.safetensors"
    save_bundle(new_bundle(model, config=config, input_size=32), path)
    data = nih_factory()
    out = tmp_path / "ch.json"
    assert main(["analyze", "channels", "--model", str(path), "--data", str(data), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert str(data) in result["label_source"]["source"] and "40 images" in result["label_source"]["source"]
    assert {ch["channel"] for ch in result["channels"]} == {0, 1, 2, 3, 4}
    assert sum(result["category_counts"].values()) == len(result["channels"])
    assert result["definition"].startswith("strong: |w_kc| > P-th percentile")
    # Another label source changes J, not the channels; --activations needs images.
    assert main(["analyze", "channels", "--model", str(path), "--data", str(data), "--activations",
                 "--json", str(out)]) == 0
    assert all(ch["mean_activation"] is not None for ch in json.loads(out.read_text())["channels"])
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "channels", "--model", str(path)])
    assert exc.value.code == 2
