"""Where the data lives: --data-file, $MEMOE_DATA, the EasyEdit checkout's data/, or a clear error."""
import pytest

from memoe_plugin.eval.data import DATA_FILES, DataNotFoundError, data_file
from memoe_plugin.eval.records import dataset_requests


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    monkeypatch.delenv("MEMOE_DATA", raising=False)
    monkeypatch.delenv("EASYEDIT_PATH", raising=False)


def test_explicit_then_folder_then_easyedit_checkout(tmp_path, monkeypatch):
    explicit = tmp_path / "mine.json"
    explicit.write_text("[]")
    assert data_file("zsre", explicit) == explicit.resolve()
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "counterfact-edit.json").write_text("[]")
    monkeypatch.setenv("MEMOE_DATA", str(folder))
    assert data_file("counterfact") == (folder / "counterfact-edit.json").resolve()
    checkout = tmp_path / "EasyEdit"
    (checkout / "data" / "portability" / "One Hop").mkdir(parents=True)
    (checkout / "data" / "portability" / "One Hop" / "zsre_mend_eval_portability_gpt4.json").write_text("[]")
    assert data_file("zsre", easyedit_path=str(checkout)).name == "zsre_mend_eval_portability_gpt4.json"
    (folder / "wiki_counterfact_train_cf.json").write_text("[]")     # the shared file name of KnowEdit's train_cf
    assert data_file("counterfact-knowedit").name == "wiki_counterfact_train_cf.json"


def test_nothing_found_names_the_files_and_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOE_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        data_file("zsre-knowedit")
    message = str(err.value)
    assert "ZsRE-test-all.json" in message and "huggingface.co/datasets/zjunlp/KnowEdit" in message
    assert str(tmp_path) in message and "--data-file" in message and "MEMOE_DATA" in message
    with pytest.raises(DataNotFoundError, match="unknown dataset"):
        data_file("nope")
    with pytest.raises(DataNotFoundError, match="not found"):
        data_file("zsre", tmp_path / "missing.json")
    assert set(DATA_FILES) >= {"zsre", "counterfact", "zsre-knowedit", "counterfact-knowedit"}


def test_requests_fall_back_to_the_examples_only_when_asked():
    with pytest.raises(DataNotFoundError):
        dataset_requests("zsre")
    examples = dataset_requests("zsre", limit=2, examples_if_missing=True)
    assert [r["target_new"] for r in examples] == ["Rome", "Japanese"]
