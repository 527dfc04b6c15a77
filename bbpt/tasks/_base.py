"""What a task is: examples, a template that turns one into text, and what is scored.

A task's ``kind`` says what the backend measures for it: ``classification`` (each class's label-word
log-prob) or ``generation`` (the log-likelihood of each example's reference answer, its *target*). The rest of
bbpt reads the kind as data: the backend encodes targets when examples carry them, the objective turns either
kind of score into one loss per candidate, and the study loop sees only losses.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from bbpt.errors import ConfigError

SLOTS = ("text", "text_pair", "prompt")
PROMPT_SEPARATOR = "\n"
PLACEMENTS = ("prefix", "infix", "suffix")
KINDS = ("classification", "generation")


@dataclass(frozen=True)
class Example:
    text: str
    label: int = 0
    text_pair: str | None = None
    # generation: the reference answers; the first is the one training and NLL read, all of them score BLEU
    targets: tuple[str, ...] = ()
    # chat data: the conversation before the answer, as (role, content) pairs; a backend with a chat template
    # renders it with that template, and ``text`` is the plain rendering used where there is none
    chat: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class Template:
    """A format string with ``{text}``, optionally ``{text_pair}`` and ``{prompt}``.

    ``{prompt}`` marks where the soft (or discrete) prompt goes; without it the prompt is a prefix, as in
    PEFT's prompt tuning. Rendering splits the text at that point, because a soft prompt is not text: the
    backend embeds the two pieces and joins them around the prompt's rows.
    """

    source: str

    def __post_init__(self) -> None:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.source) if f is not None]
        except ValueError as e:
            raise ConfigError(f"template {self.source!r} is not a valid format string ({e}); "
                              "write literal braces as {{ and }}") from None
        unknown = sorted(set(names) - set(SLOTS))
        if unknown:
            raise ConfigError(f"template {self.source!r} has unknown field(s) {unknown}; "
                              f"allowed fields are {{text}}, {{text_pair}} and {{prompt}}")
        if "text" not in names:
            raise ConfigError(f"template {self.source!r} has no {{text}} field; add one where the input goes, "
                              'e.g. "Review: {text}\\nSentiment:"')
        if names.count("prompt") > 1:
            raise ConfigError(f"template {self.source!r} has {{prompt}} more than once; use it at most once")

    @property
    def has_pair(self) -> bool:
        return "{text_pair}" in self.source

    @property
    def placement(self) -> str:
        """``prefix`` when the prompt leads, ``suffix`` when it closes the template (nothing but whitespace after
        it: the answer follows the prompt), ``infix`` when text comes before it and after it."""
        if "{prompt}" not in self.source:
            return "prefix"
        head, tail = self.source.split("{prompt}")
        if "{text" not in head:
            return "prefix"
        return "suffix" if not tail.strip() else "infix"

    def at(self, position: str | None) -> "Template":
        """This template with the prompt at ``position``: ``prefix`` (before everything), ``infix`` (right
        after the last text field and the whitespace that follows it, so before the answer cue:
        ``Review: {text}\\n{prompt}Sentiment:``) or ``suffix`` (after the answer cue, so the answer follows the
        prompt: ``Review: {text}\\nSentiment:{prompt}``). None keeps the template as written.

        Why suffix: a call of a searched prompt recomputes every token from the prompt on, once per candidate
        and example; the text before it is encoded once per study. Infix still recomputes the cue (34 tokens on
        DBpedia, whose cue lists its 14 classes); suffix recomputes only the m prompt tokens."""
        if position is None:
            return self
        if position not in PLACEMENTS:
            raise ConfigError(f"unknown --prompt-position {position!r}; choose prefix, infix or suffix")
        if "{prompt}" in self.source:
            if self.placement != position:
                raise ConfigError(f"template {self.source!r} puts {{prompt}} in {self.placement} position but "
                                  f"--prompt-position is {position}; drop one of the two")
            return self
        if position == "prefix":
            return self
        if position == "suffix":
            return Template(self.source + "{prompt}")
        end = max(self.source.rfind(f) + len(f) for f in ("{text}", "{text_pair}") if f in self.source)
        while end < len(self.source) and self.source[end].isspace():
            end += 1
        return Template(self.source[:end] + "{prompt}" + self.source[end:])

    def render(self, ex: Example) -> tuple[str, str]:
        """Return (text before the prompt, text after it)."""
        if self.has_pair and ex.text_pair is None:
            raise ConfigError(f"template {self.source!r} uses {{text_pair}} but an example has none; "
                              "pass --text-pair-field or drop {text_pair} from the template")
        full = self.source.replace("{prompt}", "\0")
        full = full.format(text=ex.text, text_pair=ex.text_pair or "")
        before, _, after = full.rpartition("\0") if "\0" in full else ("", "", full)
        return before, after

    def render_plain(self, ex: Example, prompt_text: str = "") -> str:
        """The whole text with a discrete prompt (or nothing) in the prompt's place."""
        before, after = self.render(ex)
        return before + prompt_text + after

    def render_text_prompt(self, ex: Example, prompt_text: str | None) -> str:
        """The text an API sees for a discrete prompt: where ``{prompt}`` says (spacing is the template's), or
        without it, leading on a line of its own (a soft prompt needs no separator; words do)."""
        if not prompt_text:
            return self.render_plain(ex)
        if "{prompt}" in self.source:
            return self.render_plain(ex, prompt_text)
        return prompt_text + PROMPT_SEPARATOR + self.render_plain(ex)

    def chat_parts(self, ex: Example, prompt_text: str | None) -> tuple[str | None, str]:
        """(system message, user message) for chat APIs: without ``{prompt}`` a discrete prompt is the system
        message; with it, it sits in the user message where marked."""
        if prompt_text and "{prompt}" not in self.source:
            return prompt_text, self.render_plain(ex)
        return None, self.render_plain(ex, prompt_text or "")


@dataclass
class Task:
    """A few-shot task, already split. Classification: label i is spoken as ``label_words[i]``. Generation:
    no labels; each example carries its reference answers (``Example.targets``)."""

    name: str
    label_names: list[str]
    label_words: list[str]
    template: Template
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    metric: str = "accuracy"
    init_text: str = ""
    meta: dict = field(default_factory=dict)
    kind: str = "classification"

    @property
    def score_name(self) -> str:
        """The dev metric selection compares (higher is better): accuracy, macro-F1, or for generation the
        mean log-prob per target token."""
        return {"f1": "f1", "logprob": "logprob"}.get(self.metric, "accuracy")

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "dev", "test"):
            raise ConfigError(f"unknown split {name!r}; choose train, dev or test")
        return getattr(self, name)
