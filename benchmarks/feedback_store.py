"""What the feedback store adds to a prediction request: ``Feedback.remember`` (fresh ids, one record per answer,
the bounded store) timed alone, per request of 1 and 16 inputs. The side-by-side server runs are
``benchmarks/overhead.py --server-only`` with and without ``--server-flags --feedback-store-size 0``::

    python -m benchmarks.feedback_store
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from adapters.feedback import FeedbackLog
from service.feedback import AnswerStore, Feedback, ServedAnswer, answer_ids
from service.metrics import Metrics

REQUESTS = 5000


def served(count: int, draws: int = 0) -> list[ServedAnswer]:
    """``count`` answers; with ``draws``, a posterior answer's per-draw probabilities too (what the store keeps)."""
    now = time.time()
    sample_probs = [[0.1, 0.9]] * draws or None
    return [
        ServedAnswer("a", "1", "", ["negative", "positive"], "a gorgeous, witty, seductive movie.", [0.1, 0.9], 1,
                     None, None, False, "map" if not draws else "sample", now, sample_probs=sample_probs)
        for _ in range(count)
    ]  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        feedback = Feedback(AnswerStore(20_000, 86_400), Metrics(), FeedbackLog(Path(tmp)))
        for draws in (0, 16):
            for count in (1, 16):
                start = time.perf_counter()
                for _ in range(REQUESTS):
                    feedback.remember(answer_ids(count), served(count, draws))
                per_request = (time.perf_counter() - start) / REQUESTS
                kind = f"S = {draws} draws kept" if draws else "map"
                print(f"{count:>2} inputs per request, {kind}: {per_request * 1e6:.1f} µs per request")


if __name__ == "__main__":
    main()
