"""``--prompt-position auto`` for a soft prompt searched without gradients: lead short inputs, follow long ones.

A searched prompt after the input (infix) lets every call reuse the input's keys/values, encoded once per study,
so a call recomputes only the prompt and the answer cue; a prompt leading the input (prefix) makes every call
recompute the input too. Where inputs are long that costs the search most of its calls in a given time: on the
BBT suite (studies/bbt_suite_v2.toml, seed 0, CMA-ES at 2x backprop's seconds) leading tied on MRPC and lost
1.6-21 points on the five other tasks whose leading calls recompute 2.35-7.5x the text. Where inputs are short
it costs little and pays: on SST-2 (1.8-2.0x) P0 leading the input scores a lower loss on train and dev at every seed, and the default
recipe with the prompt leading scored 80.2 +- 0.3 % test against 72.7 +- 14.9 after the input (three seeds,
the recipe_2x_prefix and recipe_2x arms). The cut sits between those two groups (set after seeing them).

The cost is counted in characters, so that every backend (a remote one has no tokenizer here) decides alike:
the text a call recomputes per example, with the prompt's m virtual tokens at CHARS_PER_TOKEN characters each.
It is decided on the template without demonstrations (--demos writes them before the input, where a leading
prompt would make every call recompute them too; --demos auto then chooses under the placement chosen here).
"""

from __future__ import annotations

from bbpt.tasks._base import Example, Template

CHARS_PER_TOKEN = 4     # English text averages about 4 characters a BPE token
LEAD_COST_MAX = 2.2     # lead where a call then recomputes at most this many times what it does after the input


def lead_cost(template: Template, examples: list[Example], prompt_tokens: int) -> float:
    """How many times the text a call recomputes grows when the prompt leads the input instead of following it
    (``template`` places no prompt; the text of all ``examples`` together)."""
    infix, prefix = template.at("infix"), template.at("prefix")
    m = prompt_tokens * CHARS_PER_TOKEN
    after = sum(len(infix.render(ex)[1]) for ex in examples)
    whole = sum(len("".join(prefix.render(ex))) for ex in examples)
    return (m * len(examples) + whole) / (m * len(examples) + after)


def auto_position(template: Template, examples: list[Example], prompt_tokens: int) -> str:
    """``prefix`` where leading costs at most LEAD_COST_MAX times following, else ``infix``."""
    return "prefix" if lead_cost(template, examples, prompt_tokens) <= LEAD_COST_MAX else "infix"
