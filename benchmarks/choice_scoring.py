"""How a causal LM should score multiple choice: zero-shot accuracy and NLL of each scoring on validation.

Builds the pipeline's model (SmolLM2 by default, cores at their ~0 initialisation: the LM as it is) on the
embedded ARC-Easy split and scores the carved validation questions (and, for the record only, the test
questions) with letter scoring and with cloze scoring under each length normalisation. The default
normalisation is the one with the best validation accuracy (docs/results.md); the test figures are never
used to choose.

Usage::

    python benchmarks/choice_scoring.py --json docs/results/choice-scoring-arc-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks importable

from adapters.tasks import mask_choices
from adapters.vocab import ClozeNormalisation
from benchmarks.harness import write_results
from training.config import TrainConfig
from training.inference import labels_of, predict
from training.metrics import classification_metrics
from training.session import prepare

SCORINGS = [("letter", None)] + [("cloze", str(n)) for n in ClozeNormalisation]


def score(base_model: str, scoring: str, normalisation: str | None, validation_size: int, limit: int | None) -> dict:
    """Zero-shot metrics of one scoring on the validation and test questions."""
    extra = {} if normalisation is None else {"cloze_normalisation": normalisation}
    config = TrainConfig.from_flat(
        base_model=base_model, dataset="arc-easy", validation_size=validation_size, mc_scoring=scoring,
        eval_limit=limit, batch_size=8, progress=True, **extra,
    )  # fmt: skip
    session = prepare(config)
    row: dict = {"scoring": scoring, "normalisation": normalisation}
    for split, examples in (("validation", session.validation), ("test", session.test)):
        start = time.perf_counter()
        logits = predict(session.model, examples, session.encoder, batch_size=8, desc=split).logits[0]
        logits = mask_choices(logits, [e.num_choices for e in examples])
        row[split] = classification_metrics(logits.softmax(-1), labels_of(examples))
        row[split]["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2")
    parser.add_argument("--validation-size", type=int, default=300)
    parser.add_argument("--eval-limit", type=int, default=None, help="at most this many questions per split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for scoring, normalisation in SCORINGS:
        rows.append(score(args.base_model, scoring, normalisation, args.validation_size, args.eval_limit))
        row = rows[-1]
        print(
            f"{scoring:7} {normalisation or '':7} validation acc {row['validation']['accuracy']:.3f} "
            f"NLL {row['validation']['nll']:.3f} | test acc {row['test']['accuracy']:.3f} NLL {row['test']['nll']:.3f}"
        )
    cloze = [r for r in rows if r["scoring"] == "cloze"]
    chosen = max(cloze, key=lambda r: r["validation"]["accuracy"])
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "base_model": args.base_model,
        "rows": rows,
        "chosen_normalisation": chosen["normalisation"],
    }
    print(f"best validation accuracy among the cloze normalisations: {chosen['normalisation']}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
