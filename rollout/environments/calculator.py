"""calculator: the embedded arithmetic task ("23+58=") with a calculator tool, over several turns.

The prompt is the problem. Each policy turn ends at EOS or at "=" (the call marker, a turn_stop):
    "81"       an answer: the episode ends and the answer is scored as `arithmetic` scores it
    "23+58="   a call: an expression "a op b" (op one of + - *) closed by "=". The observation is its value
               and a newline, "81\\n", and the policy takes the next turn
    "="        a call on the prompt's own problem (the one-token spelling of the call above)
Anything else (a turn ending in "=" that is no expression, text cut off by the budget) is the final answer,
wrong unless it is the right integer. A conversation with one call, as the model sees it:

    <bos>23+58=   23+58=   81\\n   81<eos>
    prompt        call     tool    answer           (loss on the call and the answer only)

The tiny char-level model knows only digits, "+-*=", ",", " " and newline, so the call is spelled in them: it
is the "a+b=" the model was pretrained on, and the tool writes the result the model would have had to get
right; the newline (never seen in pretraining) marks the tool's text as ended. Calling and copying the result
is a sure route to the reward, but a model pretrained on "a+b=c" alone rarely takes it: configs/pretrain_tiny's
step-400 model puts ~6e-5 of its first token's probability on "=" and less on a restated problem, so GRPO from
there mostly trains the direct answer; a policy that is to learn the tool needs to have seen it (SFT on
transcripts like the one above) or much more exploration.

Reward: correct_reward for the right final answer, plus format_reward when it is well formed (an integer that
ended the episode, i.e. not cut off by max_turns or the token budget). A call in the last allowed turn
(max_turns, default 3) ends the episode unanswered.
"""

from __future__ import annotations

import re
from typing import Any

from core.data.synthetic import OPERATORS
from rollout.environments.arithmetic import ArithmeticEnvironment, solve
from rollout.environments.base import register_environment
from rollout.environments.multiturn import MultiTurnEnvironment

_CALL = re.compile(r"^\s*(?:(\d{1,9})\s*([+\-*])\s*(\d{1,9})\s*)?=$")
_INTEGER = re.compile(r"^-?\d+$")


def calculate(turn: str, prompt: str) -> int | None:
    """The value of a call ("23+58=" -> 81; "=" -> the prompt's problem); None when the turn is no call."""
    m = _CALL.match(turn)
    if m is None:
        return None
    if m.group(2) is None:
        return solve(prompt)
    return OPERATORS[m.group(2)](int(m.group(1)), int(m.group(3)))


@register_environment("calculator")
class CalculatorEnvironment(MultiTurnEnvironment, ArithmeticEnvironment):
    """Final answers judged (and rows checked) as `arithmetic` does."""

    turn_stop = ("=",)

    def __init__(self, correct_reward: float = 1.0, format_reward: float = 0.0, max_turns: int = 3) -> None:
        super().__init__(correct_reward, format_reward, max_turns)

    def step(self, state: Any, turn: str) -> str | None:
        value = calculate(turn, state["prompt"])  # state: the row (MultiTurnEnvironment.reset)
        return None if value is None else f"{value}\n"
