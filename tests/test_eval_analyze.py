"""memoe-analyze: the routing statistics, and a whole run on a tiny Llama."""
import json

import torch
import yaml

from memoe_plugin.eval.state import state_fingerprint
from compare_fakes import fake_records


def test_analyze_statistics():
    from memoe_plugin.eval.analyze import agreement, chance_agreement, kmeans, utilisation
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0], [0.0, 0.1]])
    labels = kmeans(points, 2, seed=0).tolist()
    assert labels[0] == labels[1] == labels[4] != labels[2] == labels[3]
    assert agreement([0, 0, 1, 1], [2, 2, 3, 1]) == 0.75
    assert chance_agreement([0, 0, 1, 1], [2, 2, 2, 2]) == 1.0
    u = utilisation([0, 0, 1, -1], 4)
    assert u["counts"] == [2, 1, 0, 0] and abs(sum(u["shares"]) - 1) < 1e-9 and 0 < u["normalised_entropy"] < 1


def test_analyze_end_to_end_on_a_tiny_llama(tmp_path, tokenizer):
    from conftest import tiny_llama
    from memoe_plugin import get_adapter
    from memoe_plugin.eval import analyze
    model = tiny_llama(len(tokenizer))
    hparams = tmp_path / "memoe.yaml"
    hparams.write_text(yaml.safe_dump(dict(alg_name="MEMoE", model_name="tiny-llama", layer=2,
                                           module_template="model.layers.{}.mlp.down_proj", lr=5e-2, steps=20,
                                           anchor_backend="offline", early_stop=False)))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(fake_records(6)))
    before = state_fingerprint(model)
    assert analyze.main(["--hparams", str(hparams), "--data-file", str(data), "--num-edits", "6",
                         "--batch-size", "3", "--clusters", "2", "--out", str(tmp_path / "a")],
                        model_and_tokenizer=(model, tokenizer)) == 0
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert result["num_edits"] == 6 and result["same_knowledge"]["pairs"] == 6
    assert 0 <= result["same_knowledge"]["same_top1_expert"] <= 1
    assert sum(result["utilisation"]["edit_last"]["counts"]) == 6
    assert "same knowledge" in (tmp_path / "a" / "analysis.md").read_text()
    assert get_adapter(model) is None and state_fingerprint(model) == before      # restored afterwards
