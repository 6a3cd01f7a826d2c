"""memoe-compare: MEMoE next to EasyEdit's baselines under the paper's protocols, scored by EasyEdit.

* :mod:`.methods`: the methods (their EasyEdit names, settings files and needs, as data on each MethodSpec);
* :mod:`.plan`: what runs (:class:`RunSpec`) and its chunks; :mod:`.requests`: EasyEdit's request format;
* :mod:`.protocol`: the batch and sequential protocols (:class:`Runner`); :mod:`.resume`: what is done, and
  the sequential checkpoints; :mod:`.distributed`: the same units of work as Ray tasks;
* :mod:`.store`: the append-only results file; :mod:`.report`: its tables and chart;
* :mod:`.easyedit_backend`: records, edits, scores and rollback through EasyEdit;
* :mod:`.stats`: covariance statistics from local text; :mod:`.cli`: the command.
"""
from .cli import build_parser, main
from .easyedit_backend import EasyEditBackend, EasyEditSession, load_records
from .errors import CompareError, MethodUnavailable, RollbackError
from .methods import DEFAULT_METHODS, METHODS, MethodSpec, build_config, hparams_path_for, parse_methods, parse_overrides
from .plan import RunSpec, chunk_ranges
from .protocol import Runner
from .requests import PreparedRecords, combine_restore, prepare_records, request_kwargs
from .report import markdown_summary, summarise, write_summary
from .store import ResultStore

__all__ = ["main", "build_parser", "EasyEditBackend", "EasyEditSession", "load_records", "CompareError",
           "MethodUnavailable", "RollbackError", "DEFAULT_METHODS", "METHODS", "MethodSpec", "build_config",
           "hparams_path_for", "parse_methods", "parse_overrides", "RunSpec", "Runner", "chunk_ranges",
           "combine_restore", "prepare_records", "PreparedRecords", "request_kwargs", "markdown_summary", "summarise", "write_summary",
           "ResultStore"]
