"""Key scope (an extension): the bypass acts only where its input resembles an input it was trained on.

The locality guard decides on a string: an edited entity in the prefix. That protects prompts
about other subjects, but every question about an edited subject passes it, so an edit about
one relation of a subject changes the model's answers about all of them. The key scope decides
on the representation. For every edit it keeps *keys*: the scope's view of the positions that
predict the edit's target tokens (the bypass input, or the residual stream entering an earlier
block: ``scope_layer``), centred, optionally projected on the leading directions of the first
call's inputs (``scope_rank``), and unit-normalised. A position is in scope when its own view has
cosine similarity at least ``threshold`` with a key of an edit whose anchor is in sight (the
guard's match, when the guard is on).

*Anti-keys* (``scope_anti_keys``) tell facts apart where a threshold cannot. A question about
another relation of the same subject that shares the edit's wording can be closer to the edit's
key than the edit's own rewordings are. For each edit the scope keeps the views of prompts about
its subject that ask for other relations (``routing.relations``), and a position that matched
the edit's key is put out of scope when it is nearer one of that edit's anti-keys than the key
(by ``anti_margin``). An anti-key written in the edit's own words (``same_frame``) is nearly the
key itself, so a rewording of the edit can be as near to it as to the key; it counts only where
the position is a near-copy of it (cosine at least ``copy_similarity``).

The view of the adapted layer does not depend on the bypass (the bypass adds to that layer's
output, and an earlier block is earlier still), so keys taken before training stay valid, and the
scope is causal: it looks at position ``t``'s input only, which depends on tokens ``0..t``.

With ``snap`` > 0 (``scope_snap``) the scope also keeps each key's raw bypass input, and an
in-scope position's expert reads its own input moved that share of the way to the input of the
key it matched (:meth:`KeyScope.snap_inputs`). A rewording's last token is near, not at, the edit
prompt's, and a linear expert trained on the one gives the other only part of the correction;
snapped, it gives the edit's own. ``snap`` 1 is a codebook, as GRACE's, read through the expert.

With ``snap`` 1 the expert's output at a position that matched a key depends on that key alone: ``W_e x_key``.
``scope_values`` keeps it so: at the end of each edit call the call's keys are *closed* (:meth:`KeyScope.close`),
each with its output as one *value* row of the projection's output width, and their inputs are dropped. Keys
``0 .. closed - 1`` have values; the keys from ``closed`` on are the open call's, read through its experts.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .lru import LRU
from .rows import STORAGE_DTYPES, EditIndex, pack_rows, unpack_rows  # noqa: F401 (re-exported)
from .template import IN_CHAT, PLAIN

NO_FLOOR = -2.0     # an anti-key whose floor is below every cosine: nearness alone counts, by ``anti_margin``
MADE_CACHE_SIZE = 32   # subject vectors whose made anti-keys are kept (2 x 64 x 1,536 floats: 786 KB each on SmolLM2)
ANY_FLOOR = -1.0    # an anti-key that counts wherever a position is nearer it than its key, whatever the margin


class Match(NamedTuple):
    """Per position: best cosine similarity to a key, the edit and the index of that key ((-1, -1, -1)
    where no key counts), and whether one of that edit's anti-keys put the position out of scope."""
    similarity: torch.Tensor
    edit: torch.Tensor
    key: torch.Tensor
    blocked: torch.Tensor


class KeyScope(nn.Module):
    """Keys (and anti-keys) of the edited positions, and the test of a position against them.

    ``dim`` is the width of what the scope reads, ``input_dim`` that of the bypass input (the snap
    keeps one per key); ``rank`` > 0 compares views projected on that many leading directions of the
    first call's inputs (fixed by :meth:`calibrate`; ``projection`` "random": on a random orthonormal subspace fixed by
    ``seed``, which preserves cosines to about 1/sqrt(rank) whatever the inputs), which also bounds the bytes each key
    keeps."""

    def __init__(self, dim: int, threshold: float, device=None, snap: float = 0.0, input_dim: Optional[int] = None,
                 rank: int = 0, anti_margin: float = 0.0, copy_similarity: float = 1.0, storage: str = "float16",
                 output_dim: int = 0, projection: str = "leading", seed: int = 0, chat_reads_plain: bool = False):
        super().__init__()
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"scope storage {storage!r}: use one of {sorted(STORAGE_DTYPES)}")
        stored = STORAGE_DTYPES[storage]
        self.storage = storage
        rank = min(rank, dim)   # a rank above the width would only pad the views with zeros
        self.threshold, self.snap, self.rank = threshold, snap, rank
        self.anti_margin, self.copy_similarity = anti_margin, copy_similarity
        # ``chat_answer: first``: a position the assistant writes (IN_CHAT) also matches plain-text keys, so a reply's
        # later tokens read the raw answer's keys (only the reply's first token is trained in the chat context)
        self.chat_reads_plain = chat_reads_plain
        view = rank or dim
        self.register_buffer("center", torch.zeros(dim, device=device))
        self.register_buffer("basis", torch.zeros(dim, rank, device=device))      # used when rank > 0
        self.projection = projection
        if rank and projection == "random":   # fixed before any input is seen: a random orthonormal rank-dim subspace
            generator = torch.Generator().manual_seed(seed)
            gaussian = torch.randn(dim, min(rank, dim), generator=generator, dtype=torch.float64)
            self.basis[:, :gaussian.shape[1]] = torch.linalg.qr(gaussian).Q.to(self.basis.device, torch.float32)
        # rows kept as ``storage`` (float16, or int8 with a float32 scale per row in the *_scale buffers)
        self.register_buffer("keys", torch.zeros(0, view, device=device, dtype=stored))
        self.register_buffer("edit_ids", torch.zeros(0, dtype=torch.long, device=device))
        # what each key's position was (routing.template: plain text, a conversation's own token, a chat template
        # token read at the conversation's last token): a key matches positions of its kind only, since its snap
        # input was trained for that context
        self.register_buffer("key_kind", torch.zeros(0, dtype=torch.int8, device=device))
        # the snap's input of each key (only with snap > 0): where the key's view is its own input centred and
        # normalised (the scope reads the bypass input, all directions), the input is that view times ``key_norm``
        # plus the centre and nothing more is kept (``input_row`` -1); else a row of ``inputs`` (a chat template
        # token's key, whose view is read at the question's last token; a scope_layer or scope_rank view)
        self.register_buffer("inputs", torch.zeros(0, input_dim or dim, device=device, dtype=stored))
        self.register_buffer("input_row", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("key_norm", torch.zeros(0, device=device))
        self.register_buffer("anti_keys", torch.zeros(0, view, device=device, dtype=stored))
        # scope_values: the output of each closed key (W_e x_key, unscaled), row i for key i; keys from ``closed`` on
        # have none yet (the open call's, still learning through the experts)
        self.register_buffer("values", torch.zeros(0, output_dim, device=device, dtype=stored))
        for name in self.SCALES.values():
            self.register_buffer(name, torch.zeros(0, device=device, dtype=torch.float32))
        self.register_buffer("anti_edit_ids", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("anti_floor", torch.zeros(0, device=device, dtype=torch.float16))
        # scope_anti_keys: prototypes. Shared: each relation's effect on the input in each context [contexts,
        # relations, dim] and each context's offset [contexts, dim] (routing.prototypes). Per edit: its subject
        # vector, and which relations it asks itself (no anti-key of its own relation)
        self.register_buffer("proto_effects", torch.zeros(0, 0, dim, device=device))
        self.register_buffer("proto_offsets", torch.zeros(0, dim, device=device))
        # each edit's subject vector, projected like the views when ``rank`` (only its view is ever needed)
        self.register_buffer("subjects", torch.zeros(0, view, device=device, dtype=stored))
        self.register_buffer("subject_ids", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("subject_skip", torch.zeros(0, 0, dtype=torch.bool, device=device))
        self.calibrated = False
        self._key_index, self._anti_index, self._subject_index = EditIndex(), EditIndex(), EditIndex()
        # the made anti-keys of the subject vectors last asked for (their views), so that generating token after
        # token does not make them again at every step; keyed by what they are made from (forget_made() on load)
        self._made = LRU(MADE_CACHE_SIZE)
        self._generation = 0

    def forget_made(self) -> None:
        """Drop the cached made anti-keys: the subject vectors, the prototypes or the centre changed."""
        self._generation += 1
        self._made.clear()

    def _made_views(self, row: int) -> torch.Tensor:
        """The unit views of subject vector ``row``'s made anti-keys (float32, cached: the same numbers as made anew)."""
        key = (row, self._generation, self.subjects.data_ptr(), self.subjects.shape[0], self.subject_skip.data_ptr(),
               self.proto_effects.data_ptr(), self.center.data_ptr())
        made = self._made.lookup(key)
        if made is None:
            subject = self.rows("subjects", torch.tensor([row]), torch.float32)[0]
            made = self.made_views(subject, self.subject_skip[row])
            made = self._made.store(key, made)
        return made

    SCALES = {"keys": "key_scale", "inputs": "input_scale", "anti_keys": "anti_scale",
              "subjects": "subject_scale", "values": "value_scale"}   # rows -> their scales

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def closed(self) -> int:
        """How many keys are closed (``scope_values``): keys ``0 .. closed - 1`` have their output kept as a value."""
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.edit_ids, self.key_kind, self.inputs,
                                                           self.input_row, self.key_norm, self.values,
                                                           self.anti_keys, self.anti_edit_ids, self.anti_floor,
                                                           self.subjects, self.subject_ids, self.subject_skip,
                                                           *(getattr(self, s) for s in self.SCALES.values())))

    @property
    def shared_nbytes(self) -> int:
        """Bytes kept once, whatever the number of edits: the centre, the directions and the relation prototypes."""
        return sum(t.numel() * t.element_size() for t in (self.center, self.basis, self.proto_effects,
                                                           self.proto_offsets))

    def rows(self, name: str, index: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
        """The kept rows ``name`` (``keys``, ``inputs``, ``anti_keys``), or those at ``index``, as ``dtype``."""
        stored, scale = getattr(self, name), getattr(self, self.SCALES[name])
        if index is not None:
            stored = stored[index.to(stored.device)]
            scale = scale[index.to(scale.device)] if scale.numel() else scale
        return unpack_rows(stored, scale, dtype)

    def _append(self, name: str, rows: torch.Tensor) -> None:
        stored, scale = pack_rows(rows, getattr(self, name).dtype)
        setattr(self, name, torch.cat([getattr(self, name), stored.to(getattr(self, name).device)]))
        scales = self.SCALES[name]
        setattr(self, scales, torch.cat([getattr(self, scales), scale.to(getattr(self, scales).device)]))

    def sizes(self) -> tuple[int, int, int]:
        """(keys, anti-keys, subject vectors) held now: what :meth:`truncate` takes back to."""
        return len(self), self.anti_keys.shape[0], self.subjects.shape[0]

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Fix the centre (and, with ``rank``, the directions) on real inputs of the first edit call; keys,
        anti-keys and queries share them."""
        x = x.float()
        self.forget_made()
        self.center.copy_(x.mean(0))
        if self.rank and self.projection == "leading":
            centred = x - self.center
            _, _, directions = torch.linalg.svd(centred, full_matrices=False)
            basis = directions[:self.rank].t()
            self.basis.zero_()
            self.basis[:, :basis.shape[1]] = basis   # fewer rows than the rank: the rest stays zero
        self.calibrated = True

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """What the keys are compared on: ``x`` centred, projected (``rank``), unit-normalised (float32)."""
        x = x.float() - self.center
        if self.rank:
            x = x @ self.basis
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def add(self, x: torch.Tensor, edit_ids: torch.Tensor, inputs: Optional[torch.Tensor] = None,
            kind: Optional[torch.Tensor] = None) -> None:
        """Keep the rows of ``x`` [n, dim] as keys of the edits ``edit_ids`` [n]; ``inputs`` [n, input_dim] are
        their bypass inputs (default ``x``), kept for the snap; ``kind`` [n] is what each key's position was
        (``routing.template``; default: plain text)."""
        self._append("keys", self.view(x))
        self.edit_ids = torch.cat([self.edit_ids, edit_ids.to(self.edit_ids.device, torch.long)])
        if self.snap > 0:
            inputs = x if inputs is None else inputs
            own = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            if x.shape == inputs.shape and not self.rank:   # the view is the input's own: keep the view alone
                own = (x == inputs).all(-1)
            rows = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
            rows[~own] = self.inputs.shape[0] + torch.arange(int((~own).sum()), device=x.device)
            self._append("inputs", inputs[~own].detach())
            self.input_row = torch.cat([self.input_row, rows.to(self.input_row.device)])
            self.key_norm = torch.cat([self.key_norm, (x.float() - self.center).norm(dim=-1).to(self.key_norm.device)])
        kinds = torch.zeros(x.shape[0], dtype=torch.int8) if kind is None else kind.to(torch.int8)
        self.key_kind = torch.cat([self.key_kind, kinds.to(self.key_kind.device)])

    @torch.no_grad()
    def add_anti_keys(self, x: torch.Tensor, edit_ids: torch.Tensor, floors: torch.Tensor) -> None:
        """Keep the rows of ``x`` [n, dim] as anti-keys of ``edit_ids`` [n]; ``floors`` [n] is the similarity a
        position needs to an anti-key before nearness to it counts (:data:`NO_FLOOR`: none)."""
        self._append("anti_keys", self.view(x))
        self.anti_edit_ids = torch.cat([self.anti_edit_ids, edit_ids.to(self.anti_edit_ids.device, torch.long)])
        self.anti_floor = torch.cat([self.anti_floor, floors.to(self.anti_floor.device, self.anti_floor.dtype)])

    @torch.no_grad()
    def set_prototypes(self, effects: torch.Tensor, offsets: torch.Tensor) -> None:
        """The relation prototypes the synthetic anti-keys are made of (``scope_anti_keys: prototypes``)."""
        self.forget_made()
        self.proto_effects = effects.to(self.center.device, torch.float32)
        self.proto_offsets = offsets.to(self.center.device, torch.float32)

    @property
    def has_prototypes(self) -> bool:
        return self.proto_effects.numel() > 0

    @torch.no_grad()
    def add_subjects(self, vectors: torch.Tensor, edit_ids: torch.Tensor, skip: torch.Tensor) -> None:
        """Keep each edit's subject vector [n, dim] and the relations it asks [n, relations] (bool)."""
        self.forget_made()
        vectors = vectors.float()
        self._append("subjects", vectors @ self.basis.to(vectors.device) if self.rank else vectors)
        self.subject_ids = torch.cat([self.subject_ids, edit_ids.to(self.subject_ids.device, torch.long)])
        have = self.subject_skip if self.subject_skip.shape[0] else self.subject_skip.new_zeros(0, skip.shape[1])
        self.subject_skip = torch.cat([have, skip.to(have.device, torch.bool)])

    @torch.no_grad()
    def truncate(self, sizes: tuple[int, ...]) -> None:
        """Drop the keys, anti-keys and subject vectors added after ``sizes`` (:meth:`sizes`; a failed edit call
        takes its own back)."""
        keys, anti, subjects = (tuple(sizes) + (self.subjects.shape[0],))[:3]
        self.forget_made()
        self.subjects, self.subject_ids = self.subjects[:subjects], self.subject_ids[:subjects]
        self.subject_skip, self.subject_scale = self.subject_skip[:subjects], self.subject_scale[:subjects]
        self.keys, self.edit_ids = self.keys[:keys], self.edit_ids[:keys]
        self.input_row, self.key_norm = self.input_row[:keys], self.key_norm[:keys]
        kept = int(self.input_row.max()) + 1 if self.input_row.numel() and int(self.input_row.max()) >= 0 else 0
        self.inputs, self.input_scale = self.inputs[:kept], self.input_scale[:kept]
        self.key_kind = self.key_kind[:keys]
        self.anti_keys, self.anti_edit_ids = self.anti_keys[:anti], self.anti_edit_ids[:anti]
        self.anti_floor = self.anti_floor[:anti]
        self.key_scale = self.key_scale[:keys]
        self.anti_scale = self.anti_scale[:anti]
        self.values, self.value_scale = self.values[:keys], self.value_scale[:keys]

    @torch.no_grad()
    def close(self, outputs: torch.Tensor) -> None:
        """Close the open keys (``closed .. len - 1``): keep ``outputs`` [open keys, out] as their values, and drop the
        layer inputs the snap kept for them (a closed key's output no longer depends on an input)."""
        if outputs.shape[0] != len(self) - self.closed:
            raise ValueError(f"{outputs.shape[0]} values for {len(self) - self.closed} open keys")
        self._append("values", outputs)
        self.inputs, self.input_scale = self.inputs[:0], self.input_scale[:0]
        self.input_row = torch.full_like(self.input_row, -1)

    def key_values(self, key: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """[..., out] (float32): the value of the key each position matched (``key`` [...]) where ``where`` [...] holds
        and that key is closed; zero elsewhere."""
        out = torch.zeros(*key.shape, self.values.shape[1], device=key.device)
        rows = where & (key >= 0) & (key < self.closed)
        if bool(rows.any()):
            out[rows] = self.rows("values", key[rows]).to(out.device)
        return out

    def match(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None,
              sight: Optional[torch.Tensor] = None, kind: Optional[torch.Tensor] = None) -> Match:
        """Best cosine similarity of each row of ``x`` [..., dim] to a key, the edit that key belongs to, the
        key's index, and whether that edit's anti-keys block the row. ``allowed`` [..., m] (bool) limits each
        row to the keys of some edits: column j stands for edit ``sight[j]`` (``sight`` None: for edit j).
        ``kind`` [...]: what each row is (``routing.template``: plain text, a conversation's own token, a chat
        template token), matched with keys of its kind only; None: every row is plain."""
        shape = x.shape[:-1]
        flat = self.view(x.reshape(-1, x.shape[-1]))

        def nothing() -> Match:
            none = torch.full(shape, -1, dtype=torch.long, device=x.device)
            return Match(flat.new_full(shape, -1.0), none, none.clone(),
                         torch.zeros(shape, dtype=torch.bool, device=x.device))

        if not len(self):
            return nothing()
        ids, rows = self.edit_ids, None
        if allowed is not None:   # only the keys of the edits some position sees: no scan of every key
            allowed = allowed.reshape(-1, allowed.shape[-1]).to(flat.device)
            if sight is None:
                sight = torch.arange(allowed.shape[-1], device=flat.device)
            sight = sight.to(flat.device)
            rows = self._key_index.rows_of(self.edit_ids, sight[allowed.any(0)])
            if not rows.numel():
                return nothing()
            ids = self.edit_ids[rows].to(flat.device)
        sims = flat @ self.rows("keys", rows, flat.dtype).to(flat.device).t()   # [rows, keys in sight]
        kinds = self.key_kind if rows is None else self.key_kind[rows.to(self.key_kind.device)]
        row_kinds = (torch.zeros(flat.shape[0], dtype=torch.int8, device=flat.device) if kind is None
                     else kind.reshape(-1).to(flat.device, torch.int8))
        if bool(kinds.any()) or bool(row_kinds.any()):
            sims = sims.masked_fill(~self.kinds_match(row_kinds, kinds.to(flat.device)), -1.0)
        if allowed is not None:   # the column of each key's edit (every key here has one: rows_of chose them)
            sims = sims.masked_fill(~allowed[:, torch.searchsorted(sight, ids)], -1.0)
        best, index = sims.max(dim=-1)
        if rows is not None:
            index = rows.to(index.device)[index]
        none = best <= -1.0
        edit = self.edit_ids.to(index.device)[index].masked_fill(none, -1)
        blocked = self._blocked(flat, best, edit)
        return Match(best.reshape(shape), edit.reshape(shape), index.masked_fill(none, -1).reshape(shape),
                     blocked.reshape(shape))

    def kinds_match(self, row_kinds: torch.Tensor, key_kinds: torch.Tensor) -> torch.Tensor:
        """[rows, keys] (bool): which keys a row of each kind may match: keys of its own kind, and
        (``chat_reads_plain``) a reply's token also plain-text keys."""
        same = row_kinds.unsqueeze(-1) == key_kinds.unsqueeze(0)
        if self.chat_reads_plain:
            same |= (row_kinds == IN_CHAT).unsqueeze(-1) & (key_kinds == PLAIN).unsqueeze(0)
        return same

    def _blocked(self, flat: torch.Tensor, best: torch.Tensor, edit: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Rows in reach of their key (similarity >= threshold) that are nearer one of their edit's anti-keys than
        the key: by more than ``anti_margin``, or, for an anti-key with a floor, at all and at least as near as
        the floor."""
        blocked = torch.zeros_like(best, dtype=torch.bool)
        if not self.anti_keys.shape[0] and not self.subjects.shape[0]:
            return blocked
        candidates = ((best >= self.threshold) & (edit >= 0)).nonzero().flatten()
        for e in edit[candidates].unique().tolist():
            anti, floor = self.anti_keys_of(e, flat.dtype)
            if not anti.shape[0]:
                continue
            rows = candidates[edit[candidates] == e]
            anti, floor = anti.to(flat.device), floor.to(flat.device)
            for lo in range(0, rows.numel(), chunk):
                part = rows[lo:lo + chunk]
                sims = flat[part] @ anti.t()                               # [part, own]
                key = best[part].unsqueeze(-1)
                margin = torch.where(floor > NO_FLOOR, torch.zeros_like(floor), torch.full_like(floor,
                                                                                                self.anti_margin))
                blocked[part] = ((sims > key + margin) & (sims >= floor)).any(-1)   # a tie keeps the key
        return blocked

    def keys_of(self, edit: int, dtype=torch.float32) -> torch.Tensor:
        """One edit's keys (unit views [n, view])."""
        own = self._key_index.rows_of(self.edit_ids, torch.tensor([edit]))
        return self.rows("keys", own, dtype) if own.numel() else torch.zeros(0, self.keys.shape[1], dtype=dtype)

    def anti_keys_of(self, edit: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """One edit's anti-keys (unit views [n, view]) and their floors [n]: those kept (relation_bank, stop keys) and
        those made from its subject vector and the relation prototypes."""
        own = self._anti_index.rows_of(self.anti_edit_ids, torch.tensor([edit]))
        anti = [self.rows("anti_keys", own, dtype)] if own.numel() else []
        floor = [self.anti_floor[own].to(dtype)] if own.numel() else []
        if self.subjects.shape[0] and self.has_prototypes:
            row = self._subject_index.rows_of(self.subject_ids, torch.tensor([edit]))
            for r in row.tolist():
                made = self._made_views(r).to(dtype)
                anti.append(made.to(self.anti_floor.device))
                floor.append(torch.full((made.shape[0],), NO_FLOOR, dtype=dtype, device=self.anti_floor.device))
        if not anti:
            return torch.zeros(0, self.keys.shape[1], dtype=dtype), torch.zeros(0, dtype=dtype)
        return torch.cat(anti), torch.cat(floor)

    def prototype_inputs(self, subject: torch.Tensor, row: int) -> torch.Tensor:
        """The synthetic anti-key inputs of subject vector ``row``: the subject plus each relation's effect it does
        not ask, in each context, shifted by the context's offset (``routing.prototypes``)."""
        return self._made_inputs(subject, self.subject_skip[row])

    def _made_inputs(self, subject: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = skip.to(self.proto_effects.device)
        effects = self.proto_effects[:, ~skip[:self.proto_effects.shape[1]]]
        return (subject.to(effects.device) + effects + self.proto_offsets.unsqueeze(1)).reshape(-1, subject.shape[-1])

    def made_views(self, subject: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The unit views of the anti-keys made from ``subject`` (a subject vector as kept: projected with ``rank``)
        for each relation not in ``skip`` [relations] (bool), in each context: what :meth:`anti_keys_of` compares."""
        if not self.rank:
            return self.view(self._made_inputs(subject, skip))
        # the view is linear up to its norm: (s + e + o - c) B = s B + (e + o - c) B, s kept as s B
        skip = skip.to(self.proto_effects.device)
        rest = (self.proto_effects + self.proto_offsets.unsqueeze(1) - self.center) @ self.basis
        made = subject.to(rest.device) + rest[:, ~skip[:rest.shape[1]]].reshape(-1, rest.shape[-1])
        return made / made.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def kept_subject(self, vector: torch.Tensor) -> torch.Tensor:
        """A subject vector as :meth:`add_subjects` keeps it (projected with ``rank``, rounded to the storage), read
        back: what its made anti-keys will be made from."""
        row = vector.float().to(self.basis.device)
        row = row @ self.basis if self.rank else row
        return unpack_rows(*pack_rows(row.unsqueeze(0), self.subjects.dtype))[0]

    def snap_inputs(self, x: torch.Tensor, key: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """``x`` [..., input_dim] with the rows at ``where`` moved the share ``snap`` of the way to the raw input
        of their matched key ``key`` [...] when that key is open; the other rows unchanged."""
        if self.snap <= 0 or not bool(where.any()):
            return x
        if self.input_row.shape[0] != self.keys.shape[0]:
            raise RuntimeError("scope_snap needs the keys' layer inputs, and this scope has none (it was saved "
                               "or built with scope_snap: 0). Edit again with scope_snap set.")
        where = where & (key >= self.closed)   # a closed key's output is its value: nothing to read
        if not bool(where.any()):
            return x
        target = self.key_inputs(key[where]).to(x.device, x.dtype)
        out = x.clone()
        out[where] = torch.lerp(x[where], target, self.snap)
        return out

    def key_inputs(self, index: torch.Tensor) -> torch.Tensor:
        """The snap's input of the keys at ``index`` (any shape; float32 [..., input_dim])."""
        flat = index.reshape(-1).to(self.input_row.device)
        rows = self.input_row[flat]
        out = torch.zeros(flat.shape[0], self.inputs.shape[1], device=self.inputs.device)
        kept = rows >= 0
        if bool(kept.any()):
            out[kept] = self.rows("inputs", rows[kept])
        if not bool(kept.all()):   # a view of the input itself: the input is the view, scaled back, plus the centre
            made = ~kept
            out[made] = self.center + self.key_norm[flat[made]].unsqueeze(-1) * self.rows("keys", flat[made])
        return out.reshape(*index.shape, -1)

    def in_scope(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                 kind: Optional[torch.Tensor] = None) -> torch.Tensor:
        found = self.match(x, allowed, kind=kind)
        return (found.similarity >= self.threshold) & ~found.blocked
