"""The chat template's own tokens, found in token ids: what a chat puts around a question.

Asked through a chat template, a question sits between text the template writes (a default system turn,
role headers, end-of-turn markers), and the answer starts after the generation prompt
(``<|im_start|>assistant\\n``). :class:`ChatTemplate` knows those fragments of the tokenizer's template and
finds them in a sequence of token ids, so that

* the locality guard and the knowledge anchors read only what the conversation says (a default system
  prompt naming "Hugging Face" is not an entity of the conversation, so it can never count as an edited
  anchor);
* the key scope decides a template position on the last position before it that the conversation wrote
  (:meth:`ChatTemplate.sources`): at the generation prompt's last token, where the model predicts the first
  word of its reply, the layer input says little about which question was asked, while the question's last
  token says it as it does in a raw prompt.

The fragments come from rendering a few conversations whose messages are sentinels, and cutting the text
around them; each fragment is taken both as the tokenizer tokenises it in context (character offsets) and
alone. Nothing here reads an evaluation file.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .lru import LRU

_SENTINEL = "\x00memoe-{}\x00"
# What a position is for the key scope (``ChatTemplate.kinds``): a key matches positions of its own kind only, since
# its snap input was trained for that context
PLAIN, IN_CHAT, TEMPLATE, USER = 0, 1, 2, 3
ASSISTANT = "assistant"
# conversation shapes rendered to find the fragments: (role, ...) with the generation prompt after the last
_SHAPES = (("user",), ("system", "user"), ("user", "assistant", "user"), ("system", "user", "assistant", "user"))


class ChatTemplate:
    """The fixed fragments of a tokenizer's chat template, as token ids, and where they are in a sequence."""

    def __init__(self, tokenizer, cache_size: int = 4096):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template (tokenizer.chat_template is empty)")
        self.tokenizer = tokenizer
        # fragment -> the role whose text follows it (the generation prompt: the assistant's)
        fragments: dict[tuple[int, ...], str] = {}
        for shape in _SHAPES:
            for piece, role in self._fragments(shape):
                # a run of whitespace alone ("\n\n" between turns in some templates) is also what any text holds
                if piece and tokenizer.decode(list(piece)).strip():
                    fragments.setdefault(piece, role)
        if not fragments:
            raise ValueError("the tokenizer's chat template renders no text of its own around the messages")
        self.follows = fragments
        self.fragments = sorted(fragments, key=len, reverse=True)   # longest first
        self._by_first: dict[int, list[tuple[int, ...]]] = {}
        for fragment in self.fragments:
            self._by_first.setdefault(fragment[0], []).append(fragment)
        self._cache = LRU(cache_size)
        self.turn_end = self._turn_end()
        ids = tokenizer(self.turn_end, add_special_tokens=False)["input_ids"] if self.turn_end else []
        self.turn_end_id: Optional[int] = ids[0] if len(ids) == 1 else None

    @classmethod
    def of(cls, tokenizer) -> Optional["ChatTemplate"]:
        """The tokenizer's template, or None when it has none."""
        return cls(tokenizer) if getattr(tokenizer, "chat_template", None) else None

    def wrap(self, prompt: str) -> str:
        """``prompt`` as EasyEdit scores it with ``use_chat_template``: one user turn and the generation prompt (the
        template's default system turn, if it has one, included)."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False)

    def answer(self, target: str) -> str:
        """``target`` as the whole of the assistant's reply: followed by the template's end of turn, so that a chat
        answer stops where the edited fact ends instead of running on into what the base model would say next."""
        return target + self.turn_end

    # ------------------------------------------------------------------ finding
    def roles(self, ids: Sequence[int]) -> list[Optional[str]]:
        """For each position of ``ids``: None for a token the conversation wrote, else (inside a template fragment)
        the role whose text follows the fragment."""
        ids = tuple(ids)
        cached = self._cache.lookup(ids)
        if cached is not None:
            return cached
        out, at = [None] * len(ids), 0
        while at < len(ids):
            for fragment in self._by_first.get(ids[at], ()):
                if ids[at:at + len(fragment)] == fragment:
                    out[at:at + len(fragment)] = [self.follows[fragment]] * len(fragment)
                    at += len(fragment)
                    break
            else:
                at += 1
        return self._cache.store(ids, out)

    def mask(self, ids: Sequence[int]) -> list[bool]:
        """For each position of ``ids``: is the token part of a template fragment?"""
        return [role is not None for role in self.roles(ids)]

    def last_own(self, ids: Sequence[int]) -> int:
        """The position of the last token of ``ids`` that the conversation wrote (the last one when all are the
        template's)."""
        mask = self.mask(ids)
        return max((i for i, template in enumerate(mask) if not template), default=len(mask) - 1)

    def kinds(self, ids: Sequence[int]) -> list[int]:
        """For each position: :data:`TEMPLATE` inside a template fragment, :data:`IN_CHAT` for what the assistant
        says, :data:`USER` for what another role says (a user's question, a system prompt: no edit acts there, the
        decision is taken at the generation prompt), :data:`PLAIN` before any fragment."""
        out, state = [], PLAIN
        for role in self.roles(ids):
            if role is not None:
                state = IN_CHAT if role == ASSISTANT else USER
            out.append(TEMPLATE if role is not None else state)
        return out

    def split(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(own, reads)``: the tokens of ``ids`` that the conversation wrote (template fragments left out), and for
        each position of ``ids`` the index among ``own`` of the token it reads: itself; at the last token of a
        fragment the assistant's text follows (the generation prompt's last token, which predicts the reply's first
        word) the last own token before it; elsewhere in a fragment nothing (-1)."""
        roles = self.roles(ids)
        own, reads = [], []
        for at, (token, role) in enumerate(zip(ids, roles)):
            if role is None:
                own.append(token)
            answers = role == ASSISTANT and (at + 1 == len(roles) or roles[at + 1] is None)
            reads.append(len(own) - 1 if role is None or answers else -1)
        return own, reads

    # ------------------------------------------------------------------ helpers
    def _turn_end(self) -> str:
        """The text that closes an assistant turn (its first token), or the tokenizer's end of sequence."""
        sentinel = _SENTINEL.format("end")
        try:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL.format(0)},
                                                       {"role": "assistant", "content": sentinel}],
                                                      add_generation_prompt=False, tokenize=False)
        except Exception:   # noqa: BLE001 - a template that refuses the shape
            text = ""
        after = text[text.find(sentinel) + len(sentinel):] if sentinel in text else ""
        ids = self.tokenizer(after.strip(), add_special_tokens=False)["input_ids"]
        if ids:
            return self.tokenizer.decode(ids[:1])
        return self.tokenizer.eos_token or ""

    def _fragments(self, roles: tuple[str, ...]) -> list[tuple[tuple[int, ...], str]]:
        """The template's token runs between the sentinel messages of one rendered conversation, in context and
        tokenised alone, each with the role whose text follows it (the last: the assistant's, after the generation
        prompt); [] when the template refuses the shape (some have no system role)."""
        messages = [{"role": role, "content": _SENTINEL.format(i)} for i, role in enumerate(roles)]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:   # noqa: BLE001 - templates raise their own errors for shapes they do not take
            return []
        spans, cursor = [], 0
        for i in range(len(roles)):
            sentinel = _SENTINEL.format(i)
            at = text.find(sentinel, cursor)
            if at < 0:      # the template rewrote the message (merged a system turn into the user's): skip the shape
                return []
            spans.append((cursor, at))
            cursor = at + len(sentinel)
        spans.append((cursor, len(text)))
        followers = list(roles) + [ASSISTANT]
        pieces = [(tuple(self.tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]), role)
                  for (lo, hi), role in zip(spans, followers) if hi > lo]
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            for (lo, hi), role in zip(spans, followers):
                inside = tuple(t for t, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
                               if a >= lo and b <= hi and b > a)
                pieces.append((inside, role))
        return pieces
