"""Where the evaluation data lives, and the one table of the files each dataset reads.

A dataset's file is found, in this order:

1. the file given explicitly (``--data-file``);
2. ``$MEMOE_DATA``: a folder holding the file under its name (or under EasyEdit's
   ``data/`` layout below);
3. the EasyEdit checkout (``--easyedit`` or ``$EASYEDIT_PATH``): its conventional
   ``data/`` paths, as EasyEdit's README lays out the downloaded data.

When none holds it, :class:`DataNotFoundError` names every place looked in and
where the files come from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DATA_ENV = "MEMOE_DATA"


@dataclass(frozen=True)
class DataFile:
    dataset: str
    names: tuple[str, ...]          # file names it goes by (the first is EasyEdit's)
    easyedit_paths: tuple[str, ...]  # where an EasyEdit checkout keeps it, relative to the checkout
    source: str                     # where to get it


EASYEDIT_DATA = "EasyEdit's data (https://github.com/zjunlp/EasyEdit#data, unzipped into <EasyEdit>/data)"
KNOWEDIT_DATA = "KnowEdit (https://huggingface.co/datasets/zjunlp/KnowEdit, unzipped into <EasyEdit>/data/KnowEdit)"

DATA_FILES: dict[str, DataFile] = {f.dataset: f for f in (
    DataFile("zsre", ("zsre_mend_eval_portability_gpt4.json", "zsre_mend_eval.json"),
             ("data/portability/One Hop/zsre_mend_eval_portability_gpt4.json",
              "data/zsre/zsre_mend_eval_portability_gpt4.json", "data/zsre/zsre_mend_eval.json"), EASYEDIT_DATA),
    DataFile("counterfact", ("counterfact-edit.json",), ("data/counterfact/counterfact-edit.json",), EASYEDIT_DATA),
    DataFile("zsre-knowedit", ("ZsRE-test-all.json",),
             ("data/KnowEdit/ZsRE/ZsRE-test-all.json", "data/KnowEdit/benchmark/ZsRE/ZsRE-test-all.json",
              "data/knowedit/ZsRE/ZsRE-test-all.json"), KNOWEDIT_DATA),
    DataFile("counterfact-knowedit", ("wiki_counterfact_train_cf.json", "train_cf.json"),
             ("data/KnowEdit/wiki_counterfact/train_cf.json",
              "data/KnowEdit/benchmark/wiki_counterfact/train_cf.json",
              "data/knowedit/wiki_counterfact/train_cf.json"), KNOWEDIT_DATA),
)}


class DataNotFoundError(FileNotFoundError):
    """No file for a dataset was found; the message names the places looked in."""


def data_file(dataset: str, explicit: Optional[os.PathLike] = None, easyedit_path: Optional[str] = None) -> Path:
    """The file of ``dataset``: explicit, else under ``$MEMOE_DATA``, else in the EasyEdit checkout."""
    if dataset not in DATA_FILES:
        raise DataNotFoundError(f"unknown dataset {dataset!r}; known: {', '.join(DATA_FILES)}")
    spec = DATA_FILES[dataset]
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DataNotFoundError(f"{dataset}: data file {path} not found")
        return path.resolve()
    looked = []
    folder = os.environ.get(DATA_ENV)
    if folder:
        base = Path(folder).expanduser()
        candidates = [base / name for name in spec.names] + [base / p for p in spec.easyedit_paths] + \
                     [base / p.removeprefix("data/") for p in spec.easyedit_paths]
        looked += candidates
        for path in candidates:
            if path.is_file():
                return path.resolve()
    checkout = easyedit_path or os.environ.get("EASYEDIT_PATH")
    if checkout:
        candidates = [Path(checkout).expanduser() / p for p in spec.easyedit_paths]
        looked += candidates
        for path in candidates:
            if path.is_file():
                return path.resolve()
    where = "\n  ".join(str(p) for p in looked) or "(nowhere: neither $MEMOE_DATA nor an EasyEdit checkout is set)"
    raise DataNotFoundError(
        f"no data file for {dataset!r}. Expected {' or '.join(spec.names)} from {spec.source}. Looked in:\n  "
        f"{where}\nPass --data-file FILE, or set {DATA_ENV} to the folder that holds it.")
