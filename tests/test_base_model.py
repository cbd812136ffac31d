"""One loader for the frozen base (``adapters.base_model.load_base``): the trainer and the server read the same
weights and tokenize alike, and a base that cannot be loaded is one clear error for both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters import base_fingerprint, target_names
from adapters.base_model import BaseModelError, load_base
from service.host import ModelHost
from tests.service.bundles import save_tiny_base
from training.config import ConfigError
from training.session import load_training_base


def test_training_and_serving_load_the_same_base(tmp_path: Path) -> None:
    path = str(save_tiny_base(tmp_path / "base"))
    trained = load_training_base(path)
    served = ModelHost(path)
    names = target_names(trained.model, ["query", "key", "value", "dense"])
    assert base_fingerprint(trained.model, names) == served.fingerprint(names)
    served_weights = {n.replace(".base.", "."): w for n, w in served.classifier.base.state_dict().items()}
    assert served_weights.keys() == trained.model.state_dict().keys()
    assert all(torch.equal(served_weights[n], w) for n, w in trained.model.state_dict().items())
    assert trained.output_embeddings is None and served.pooling == "mean"
    text = "a served input, tokenized"
    assert trained.tokenizer(text).input_ids == served.tokenizer(text).input_ids
    assert (trained.tokenizer.pad_token, trained.tokenizer.padding_side) == (served.tokenizer.pad_token, "right")


def test_a_folder_without_config_json_is_refused_by_both(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(BaseModelError, match=r"the folder has no config\.json"):
        ModelHost(str(tmp_path / "model"))
    with pytest.raises(ConfigError, match=r"^--base-model .*model: the folder has no config\.json"):
        load_training_base(str(tmp_path / "model"))
    with pytest.raises(BaseModelError, match="no-model: no such path"):
        load_base(str(tmp_path / "no-model"))
