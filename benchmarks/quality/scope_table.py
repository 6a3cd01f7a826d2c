"""The quality table of docs/results.md (issue: generality with same-subject locality), on dev or on test.

    EASYEDIT_PATH=/path/to/EasyEdit MEMOE_DATA=../shared/data python benchmarks/quality/scope_table.py \
        --split test --num-edits 300 --seeds 0,1,2 [--methods MEMoE,FT-L,FT-M] [--out runs/scope-test]

One ``memoe-compare`` run, batch protocol (chunks of 30, each rolled back), over the three
data sets the table needs:

* ``zsre-knowedit`` (KnowEdit ``ZsRE-test-all.json``): reliability, generality, unrelated
  locality and same-subject locality (``Relation_Specificity``);
* ``counterfact`` (``counterfact-edit.json``): reliability, generality (its rephrasings),
  unrelated locality;
* ``counterfact-knowedit`` (``wiki_counterfact_train_cf.json``): reliability, unrelated and
  same-subject locality (it has no rephrasings).

Each seed draws its own records from the split; the summary gives mean ± sd over seeds.
``--split dev`` is for tuning, ``--split test`` for reporting. Everything else (``--resume``,
``--threads``, ``--hparams-dir``) is passed to memoe-compare as given.
"""
from __future__ import annotations

import argparse
import sys

from memoe_plugin.eval.compare import main as compare

DATASETS = "zsre-knowedit,counterfact,counterfact-knowedit"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("dev", "test"), required=True)
    parser.add_argument("--num-edits", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="MEMoE,FT-L,FT-M")
    parser.add_argument("--datasets", default=DATASETS)
    parser.add_argument("--out", help="default runs/scope-<split>")
    args, rest = parser.parse_known_args(argv)
    return compare(["--data", args.datasets, "--split", args.split, "--num-edits", str(args.num_edits),
                    "--seeds", args.seeds, "--methods", args.methods, "--batch-size", "30",
                    "--out", args.out or f"runs/scope-{args.split}", *rest])


if __name__ == "__main__":
    sys.exit(main())
