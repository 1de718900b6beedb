"""The no-image (blind) baseline that VQA accuracy is read against, and the KL that measures the distillation."""
import json
import math

import pytest
import torch

from nanovoco.evaluate import answer_kl, blind_baseline, kl_divergence, normalise


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


def test_kl_of_equal_distributions_is_zero_and_of_a_known_pair_its_closed_form():
    p = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).log()
    q = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()
    assert kl_divergence(p, p).tolist() == [0.0, 0.0]
    closed = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(Bernoulli(.5) || Bernoulli(.9))
    assert abs(kl_divergence(p, q)[0].item() - closed) < 1e-6 and kl_divergence(p, q)[1].item() == 0.0
    # two Gaussians discretised finely: their KL's closed form, log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    normal = lambda m, s: torch.log_softmax(-((x - m) / s) ** 2 / 2, 0)  # noqa: E731
    gaussian = math.log(2.0 / 1.0) + (1.0 + 0.5 ** 2) / (2 * 2.0 ** 2) - 0.5
    assert abs(kl_divergence(normal(0.0, 1.0), normal(0.5, 2.0)).item() - gaussian) < 1e-6
    # per record, the mean over its answer's tokens; overall the mean over records
    result = answer_kl([p, p[:1]], [q, p[:1]], ["a", "b"])
    assert abs(result["per_question"][0] - closed / 2) < 1e-6 and result["per_question"][1] == 0.0
    assert abs(result["overall"] - closed / 4) < 1e-6 and set(result["by_type"]) == {"a", "b"}
    json.dumps(result)  # goes into eval.json
    with pytest.raises(ValueError, match="record 0: the teacher's answer distributions have shape"):
        answer_kl([p], [q[:1]], [None])
    # a student with <voco> appended to the teacher's vocabulary (SmolLM2's upper bound has none): compared on the
    # teacher's vocabulary, its distribution renormalised there
    with_voco = torch.log_softmax(torch.cat([q, torch.full((2, 1), -3.0)], -1), -1)
    assert answer_kl([p], [with_voco], [None])["per_question"] == pytest.approx(answer_kl([p], [q], [None])
                                                                               ["per_question"], abs=1e-6)
    with pytest.raises(ValueError, match="have shape"):
        answer_kl([p], [torch.log_softmax(torch.zeros(2, 4), -1)], [None])  # two more: another tokenizer
