import math

import pytest

from minimoe.metrics import accuracy, binary_f1, entities, entity_f1, matthews, pearson, spearman


def test_accuracy_and_f1_by_hand():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    # tp 2, fp 1, fn 1 -> F1 = 4 / 6
    assert binary_f1(pred, gold) == pytest.approx(2 / 3)
    assert binary_f1([0, 0], [1, 0]) == 0.0


def test_matthews_by_hand():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp 2, tn 2, fp 1, fn 1 -> (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3
    assert matthews(pred, gold) == pytest.approx(1 / 3)
    assert matthews([1, 1], [1, 1]) == 0.0  # degenerate: defined as 0, as sklearn does


def test_pearson_and_spearman_with_ties():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    mx, my = 2.5, 5.0
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    want = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(x, y) == pytest.approx(want)
    assert spearman(x, y) == pytest.approx(1.0)
    # ties get the average rank: y ranks [1, 2.5, 2.5, 4]
    r = [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 3, 4], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(pearson([1, 2, 3, 4], r))


def test_entities_iob2_and_iob1():
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]
    assert entities(iob2) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)}
    # IOB1: I- starts a chunk after O or another type; B- only splits two adjacent same-type chunks
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC"]
    assert entities(iob1) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)}


def test_entity_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    # gold 3 entities, predicted 3, correct 2 -> P = R = F1 = 2/3
    got = entity_f1(pred, gold)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    # a boundary error is a miss: B-PER only covers half of the gold PER
    assert entity_f1([["B-PER", "O"]], [["B-PER", "I-PER"]])["f1"] == 0.0


def test_bad_lengths():
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        accuracy([1, 0], [1, 0, 1])
