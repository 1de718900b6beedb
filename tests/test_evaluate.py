"""The no-image (blind) baseline that VQA accuracy is read against."""
import json

from nanovoco.evaluate import blind_baseline, normalise


class Records:
    def __init__(self, records):
        self.records = records


def record(qtype, answer):
    return {"type": qtype, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]}


def test_blind_baseline_is_the_majority_answer_per_type():
    data = Records([record("shape", "circle"), record("shape", "Circle."), record("shape", "square"),
                    record("count", "two"), record("count", "three")])
    result = blind_baseline(data)
    assert result["by_type"] == {"count": 0.5, "shape": 2 / 3} and result["n"] == 5
    assert abs(result["overall"] - 3 / 5) < 1e-9
    assert blind_baseline(data, limit=2)["overall"] == 1.0
    assert normalise("  Two  Circles. ") == "two circles"
    json.dumps(result)  # goes into eval.json
