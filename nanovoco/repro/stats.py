"""Statistics of the reproduction: retention rates and standard errors, over questions and over seeds."""
import random
import statistics

BOOTSTRAP = 1000


def retention(result: float, lower: float, upper: float) -> float | None:
    """The paper's compression retention rate: how much of the gap between the lower and upper bound is kept; None
    when there is no gap (a run too short for the full model to beat the lower bound)."""
    if upper == lower:
        return None
    return (result - lower) / (upper - lower)


def accuracy_se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def retention_se(correct: list, lower: list, upper: list, seed: int = 0) -> float | None:
    """Standard error of a retention by a paired bootstrap: the held-out questions are resampled together for the
    method and both bounds (0/1 per question, the same questions in the same order)."""
    n, rng = len(correct), random.Random(seed)
    samples = []
    for _ in range(BOOTSTRAP):
        idx = [rng.randrange(n) for _ in range(n)]
        r = retention(*(sum(x[i] for i in idx) / n for x in (correct, lower, upper)))
        if r is not None:
            samples.append(r)
    return statistics.stdev(samples) if len(samples) > 1 else None


def paired_se(a: list, b: list) -> float:
    """Standard error of the accuracy difference of two methods on the same questions (0/1 each)."""
    return statistics.stdev(x - y for x, y in zip(a, b, strict=True)) / len(a) ** 0.5


def mean_sd(values) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
