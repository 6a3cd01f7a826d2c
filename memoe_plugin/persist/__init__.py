"""Save a trained MEMoE adapter to disk and load it into a fresh copy of the same model.

File format (``FORMAT_VERSION`` 2): **one ``.safetensors`` file**. Its tensors are

* ``experts``      ``[num_experts, in_features, out_features]`` float32
* ``gate.weight``  ``[num_experts, in_features + routing_dim]`` float32
* ``gate_shift``, ``gate_scale``  ``[in_features + routing_dim]`` float32: the gate
  sees ``(R(x) - gate_shift) * gate_scale`` (``gate_norm``, ``gate_token_weight``).
  Version 1 files have no such tensors; they load with the identity.

and its safetensors header metadata (a str -> str map) holds

* ``format``         ``"memoe_plugin.adapter"``
* ``format_version`` the integer as a string
* ``memoe``          one JSON document with everything else: the model's identity
  (``name_or_path``, ``model_type``, the filtered config and its sha256
  fingerprint), the tokenizer's fingerprint, the wrapped module (layer, dotted name,
  class, weight dtype and sha256), the tensors' shapes, dtypes and sha256, the full
  hparams dict, the anchor settings (including the extractor that ``auto``
  resolved to, and the locality guard's keys when ``locality_guard`` is on),
  ``memoe_plugin.__version__`` and the list of edits (as ``adapter.edits`` holds them).

No pickle is involved anywhere: tensors go through safetensors, the rest is JSON.
Everything is in one file so that a save is one atomic ``os.replace`` of a temp
file written and fsync'ed in the same directory; a reader never sees half a file.

Config fingerprint
    sha256 of ``json.dumps(config.to_dict(), sort_keys=True)`` after dropping the keys
    that do not describe the network: every key starting with ``_`` (``_name_or_path``,
    ``_commit_hash``, ``_attn_implementation*``), ``transformers_version``,
    ``architectures`` (``save_pretrained`` fills it in), ``dtype``/``torch_dtype``
    (the adapter is float32 whatever the model's dtype), and the runtime switches
    ``use_cache``, ``output_attentions``, ``output_hidden_states``, ``return_dict``.
    The filtered config itself is stored too, so a refusal names the keys that differ.
    Nested configs (``text_config`` ...) are filtered the same way.

Weights
    The config says nothing about the weights, so the sha256 of the wrapped
    projection's weight is stored as well and compared when the model is loaded in
    the same dtype (another fine-tune of the same architecture is refused). In another
    dtype (e.g. saved from float32, loaded in bfloat16) the bytes cannot match and
    that check is skipped; the logits then differ by the dtype's rounding only.

Tokenizer fingerprint
    ``len(tokenizer)`` and the sha256 of its sorted vocabulary: target tokens and
    anchors are both computed with it.
"""
from .edits import EditRemovalError, list_edits, remove_edits, remove_edits_from_file
from .file import FORMAT_VERSION, read_adapter_metadata
from .identity import config_fingerprint
from .load import load_adapter
from .save import save_adapter

__all__ = ["save_adapter", "load_adapter", "read_adapter_metadata", "config_fingerprint", "FORMAT_VERSION",
           "list_edits", "remove_edits", "remove_edits_from_file", "EditRemovalError"]
