"""Pairwise clustering scores against a ground truth, on hand-computed examples."""

from pathlib import Path

import pytest

from identity.evaluation import PairwiseScores, pairwise_scores, read_truth

# a, b, c are person P1; d, e are P2; f is P3 -> true pairs: 3 + 1 + 0 = 4
TRUTH = {("retail", "a"): "P1", ("bank", "b"): "P1", ("telecom", "c"): "P1",
         ("retail", "d"): "P2", ("bank", "e"): "P2", ("telecom", "f"): "P3"}


def test_perfect_clustering_with_other_labels():
    predicted = {k: {"P1": "C9", "P2": "C7", "P3": "C1"}[v] for k, v in TRUTH.items()}
    assert pairwise_scores(predicted, TRUTH) == PairwiseScores(1.0, 1.0, 1.0, 4, 4, 4)


def test_everything_merged():
    s = pairwise_scores({k: "C" for k in TRUTH}, TRUTH)
    assert (s.true_pairs, s.predicted_pairs, s.correct_pairs) == (4, 15, 4)
    assert s.precision == pytest.approx(4 / 15)
    assert s.recall == 1.0
    assert s.f1 == pytest.approx(2 * (4 / 15) / (4 / 15 + 1))


def test_everything_split():
    s = pairwise_scores({k: f"C{i}" for i, k in enumerate(TRUTH)}, TRUTH)
    assert s == PairwiseScores(precision=1.0, recall=0.0, f1=0.0, true_pairs=4, predicted_pairs=0, correct_pairs=0)


def test_partial_case():
    predicted = {("retail", "a"): "X", ("bank", "b"): "X", ("telecom", "c"): "Y", ("retail", "d"): "Y",
                 ("bank", "e"): "Z", ("telecom", "f"): "Z"}
    s = pairwise_scores(predicted, TRUTH)
    assert (s.true_pairs, s.predicted_pairs, s.correct_pairs) == (4, 3, 1)
    assert s.precision == pytest.approx(1 / 3)
    assert s.recall == pytest.approx(1 / 4)
    assert s.f1 == pytest.approx(2 / 7)


def test_records_outside_truth_ignored_and_missing_ones_are_singletons():
    predicted = {("retail", "a"): "X", ("bank", "b"): "X",          # c is missing -> a singleton
                 ("retail", "d"): "Y", ("bank", "e"): "Y", ("telecom", "f"): "Z",
                 ("retail", "zz"): "X", ("bank", "bad"): "Y"}       # not in truth -> ignored
    s = pairwise_scores(predicted, TRUTH)
    assert (s.true_pairs, s.predicted_pairs, s.correct_pairs) == (4, 2, 2)
    assert s.precision == 1.0 and s.recall == 0.5
    assert s.f1 == pytest.approx(2 / 3)


def test_same_source_id_in_two_units_are_distinct_records():
    truth = {("retail", "1"): "P1", ("bank", "1"): "P2"}
    s = pairwise_scores({("retail", "1"): "C", ("bank", "1"): "C"}, truth)
    assert (s.true_pairs, s.predicted_pairs, s.correct_pairs, s.precision, s.recall) == (0, 1, 0, 0.0, 1.0)


def test_empty_truth():
    assert pairwise_scores({("retail", "a"): "C"}, {}) == PairwiseScores(1.0, 1.0, 1.0, 0, 0, 0)


def test_read_truth(tmp_path: Path):
    path = tmp_path / "truth.csv"
    path.write_text("business_unit,source_id,person_id\nretail,R0000001,P0000001\nbank,B-10001,P0000001\n")
    assert read_truth(path) == {("retail", "R0000001"): "P0000001", ("bank", "B-10001"): "P0000001"}
    bad = tmp_path / "bad.csv"
    bad.write_text("unit,id\nretail,1\n")
    with pytest.raises(ValueError, match="person_id"):
        read_truth(bad)


def test_a_million_records_are_scored_exactly():
    """Counts pairs without listing them (a million records would be ~10^12 pairs to list);
    how fast is for bench/, not for a test on a shared machine."""
    truth = {("retail", str(i)): f"P{i // 3}" for i in range(1_000_000)}
    predicted = {k: f"C{int(k[1]) // 2}" for k in truth}
    s = pairwise_scores(predicted, truth)
    # persons of 3 records, clusters of 2: each 6-record block has 3 true, 3 predicted, 2 correct pairs
    assert s.true_pairs == 333_333 * 3
    assert s.predicted_pairs == 500_000
    assert s.correct_pairs == 166_666 * 2 + 1   # plus (999996, 999997) in the incomplete last block
