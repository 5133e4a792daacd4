"""`environment.name: plugin`: rewards from a Python function of yours.

    environment:
      name: plugin
      function: my_rewards:score            # a module (importable, or in the current directory) ...
      # function: rewards/length.py:score   # ... or a file, relative to the current directory
      options: {target: 20}                 # extra keyword arguments of the function
      # verifier: math                      # optional: what judges `correct` (accuracy metrics)

The function scores a batch of completions (one step's, prompt-major; or the held-out ones) at once. It is
called with keyword arguments:

    def score(prompts, completions, rows, finish_reasons, **options) -> list[float] | dict

prompts, completions: list[str], the prompt and the decoded response (special tokens removed) of each
completion; rows: list[dict], the dataset row of each (reference answers live there; copies);
finish_reasons: list[str], "stop" (EOS, a stop token or string) or "length" (ran out of max_tokens);
options: environment.options. Take **kwargs to ignore what it does not need. An `async def` function is
run to completion with asyncio, so it can await many requests at once (an LLM judge, a sandbox).

It returns one number per completion (a list, tuple, numpy array or tensor), or a dict of
    reward       one number per completion (required): what the policy maximises
    correct      one bool per completion: reward/accuracy, eval/accuracy (default: reward > 0)
    well_formed  one bool per completion: reward/well_formed (default: finish_reason == "stop")
    NAME         one number per completion, or one for the batch: logged as reward/NAME (the mean over
                 the step's completions); mean, std and accuracy are taken by the built-in metrics
With environment.verifier (a registered environment, e.g. math) the verifier judges correct and
well_formed instead; the plugin's reward stays the reward.

Checked at start, before anything is written (one line, exit 2): the spec, the import, that the name is
a callable that takes these keyword arguments (and the options). Checked on every call: a plugin that
raises, returns another number of rewards than completions, a value that is not a number, or NaN/inf
stops the run with one line (RewardPluginError, exit 2) naming the plugin and the completion (its index
in the batch and its prompt); checkpoints already written stay as they are. To name the completion a
raising plugin fails on, it is called again one completion at a time, so it should be a pure function of
its input. The plugin runs where the environment is built: the driver process (in-process and Ray runs
alike; rl/grpo_cluster.py scores in the driver), so it is never pickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.errors import InputError
from rollout.environments.base import Completion, Environment, Score

ARGUMENTS = ("prompts", "completions", "rows", "finish_reasons")
FLAGS = ("correct", "well_formed")
TAKEN = ("mean", "std", "accuracy")  # reward/mean, reward/std, reward/accuracy are the built-in metrics
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_PROMPT_CHARS = 60


class RewardPluginError(InputError):
    """A reward plugin failed during the run (raised, or returned what is not one finite number per
    completion). One line naming the plugin and the completion; exit code 2 like any bad input."""


def split_spec(spec: str) -> tuple[str, str, bool]:
    """(module or file, attribute path, is a file) of "module:function" or "path/to/file.py:function";
    InputError (a ValueError, so also a config validation error) when it is neither."""
    where, sep, name = spec.rpartition(":")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    names_ok = all(part.isidentifier() for part in name.split("."))
    if not sep or not where or not names_ok or (not is_file and not _MODULE.fullmatch(where)):
        raise InputError(
            f"environment.function={spec!r}: expected module:function or path/to/file.py:function"
        )
    return where, name, is_file


def load_function(spec: str) -> Callable[..., Any]:
    """The callable a spec names, imported now; InputError (one line) when it cannot be."""
    where, name, is_file = split_spec(spec)
    module = _import_file(spec, Path(where)) if is_file else _import_module(spec, where)
    found: Any = module
    for part in name.split("."):
        if not hasattr(found, part):
            raise InputError(f"environment.function={spec!r}: {where} has no {part!r}")
        found = getattr(found, part)
    if not callable(found):
        raise InputError(f"environment.function={spec!r}: {name} is a {type(found).__name__}, not a function")
    return found


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"environment.function={spec!r}: no file {path} (relative to {Path.cwd()})")
    resolved = path.resolve()
    # A fresh module per load (a rebuilt environment starts from the file as it is now), registered in
    # sys.modules, where dataclasses and pickle look a module up.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_reward_plugin_{stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        why = _exception(e, resolved)
        raise InputError(f"environment.function={spec!r}: importing {path} failed: {why}") from None
    return module


def _import_module(spec: str, name: str) -> Any:
    importlib.invalidate_caches()  # a module written since this process started
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name is not None and (name == e.name or name.startswith(f"{e.name}."))
        if not missing or os.getcwd() in sys.path:
            raise InputError(
                f"environment.function={spec!r}: importing {name} failed: {_exception(e)}"
            ) from None
    except Exception as e:
        raise InputError(f"environment.function={spec!r}: importing {name} failed: {_exception(e)}") from None
    sys.path.insert(0, os.getcwd())  # as `python -m` does: a module next to the config
    return _import_module(spec, name)


def check_arguments(spec: str, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """InputError unless fn takes the keyword arguments it is called with."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): the first call tells
    try:
        signature.bind(**dict.fromkeys(ARGUMENTS), **options)
    except TypeError as e:
        names = ", ".join([*ARGUMENTS, *options])
        raise InputError(
            f"environment.function={spec!r}: {fn.__name__}{signature} cannot be called with the keyword "
            f"arguments {names} ({e}); add **kwargs to take those it ignores"
        ) from None


def _exception(e: BaseException, source: Path | None = None) -> str:
    """ "ExcType: the first line of its message", and "(file.py:LINE)", the last line of the plugin's own
    file (source) the traceback went through."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    frames = [f for f in traceback.extract_tb(e.__traceback__) if source and Path(f.filename) == source]
    if frames:
        text += f" ({source.name}:{frames[-1].lineno})"
    return text


def _source_file(fn: Any) -> Path | None:
    try:
        source = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:  # a builtin or a callable object
        return None
    return Path(source).resolve() if source else None


def _shown(prompt: str) -> str:
    return repr(prompt[:_PROMPT_CHARS]) + ("..." if len(prompt) > _PROMPT_CHARS else "")


def run_to_completion(result: Any) -> Any:
    """The value of an awaitable (an async plugin's call), run with asyncio; in a thread when this thread
    already runs an event loop."""

    async def wait() -> Any:
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


class PluginEnvironment:
    """Scores completions with a user function (see the module docstring); satisfies the Environment
    protocol of algorithms/interfaces.py."""

    def __init__(
        self, function: str, options: Mapping[str, Any] | None = None, verifier: Environment | None = None
    ) -> None:
        self.spec, self.options, self.verifier = function, dict(options or {}), verifier
        self.fn = load_function(function)
        check_arguments(function, self.fn, self.options)
        self.source = _source_file(self.fn)

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        if self.verifier is not None:
            self.verifier.check_row(row, where)

    def score(self, completions: Sequence[Completion]) -> list[Score]:
        if not completions:
            return []
        try:
            out = self.call(completions)
        except Exception as e:
            raise self.locate(completions, e) from None
        return self.scores_of(out, completions)

    def call(self, completions: Sequence[Completion]) -> Any:
        out = self.fn(
            prompts=[c.prompt for c in completions],
            completions=[c.text for c in completions],
            rows=[dict(c.row) for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            **self.options,
        )
        return run_to_completion(out) if inspect.isawaitable(out) else out

    def locate(self, completions: Sequence[Completion], error: Exception) -> RewardPluginError:
        """The error naming the first completion the plugin raises on alone (it is called once per
        completion); the batch when none does."""
        if len(completions) > 1:
            for i, completion in enumerate(completions):
                try:
                    self.call([completion])
                except Exception as e:
                    return self.error(f"raised {_exception(e, self.source)}", completions, i)
            what = f"raised {_exception(error, self.source)} on the batch of {len(completions)}, though none fails alone"
            return self.error(what, completions, None)
        return self.error(f"raised {_exception(error, self.source)}", completions, 0)

    def error(self, what: str, completions: Sequence[Completion], index: int | None) -> RewardPluginError:
        """One line: the plugin, what went wrong, and the completion (index None: the whole batch)."""
        if index is None:
            where = f"(the batch's first prompt: {_shown(completions[0].prompt)})"
        else:
            where = (
                f"on completion {index} of {len(completions)} (prompt {_shown(completions[index].prompt)})"
            )
        return RewardPluginError(f"reward plugin {self.spec} {what} {where}")

    def scores_of(self, out: Any, completions: Sequence[Completion]) -> list[Score]:
        """Scores from what the plugin returned, every value checked (RewardPluginError otherwise)."""
        if isinstance(out, Mapping):
            if "reward" not in out:
                keys = ", ".join(map(repr, out))
                raise self.error(f"returned a dict without 'reward' (keys: {keys})", completions, None)
            fields = dict(out)
        else:
            fields = {"reward": out}
        rewards = self.column(fields.pop("reward"), "reward", completions)
        flags = {k: self.column(fields.pop(k), k, completions, flag=True) for k in FLAGS if k in fields}
        metrics = {name: self.metric(name, value, completions) for name, value in fields.items()}
        scores = []
        for i, (completion, reward) in enumerate(zip(completions, rewards, strict=True)):
            if self.verifier is not None:
                correct, well_formed = self.verifier.judge(completion)
            else:
                correct = flags["correct"][i] if "correct" in flags else reward > 0
                well_formed = (
                    flags["well_formed"][i] if "well_formed" in flags else completion.finish_reason == "stop"
                )
            row_metrics = {name: values[i] for name, values in metrics.items()}
            scores.append(Score(reward, bool(correct), bool(well_formed), row_metrics))
        return scores

    def column(
        self, value: Any, name: str, completions: Sequence[Completion], flag: bool = False
    ) -> list[Any]:
        """One finite number (or, flag: one bool) per completion."""
        value = _plain(value)
        n = len(completions)
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            what = f"returned {type(value).__name__} as {name}, not a list of one value per completion"
            raise self.error(what, completions, None)
        if len(value) != n:
            raise self.error(f"returned {len(value)} values of {name} for {n} completions", completions, None)
        out = []
        for i, item in enumerate(value):
            item = _plain(item)
            if not isinstance(item, numbers.Real):
                kind = "a bool" if flag else "a number"
                raise self.error(
                    f"returned {name}={item!r:.40} ({type(item).__name__}), not {kind}", completions, i
                )
            if not flag and not math.isfinite(item):
                raise self.error(f"returned {name}={item}", completions, i)
            out.append(bool(item) if flag else float(item))
        return out

    def metric(self, name: Any, value: Any, completions: Sequence[Completion]) -> list[float]:
        """An extra metric: one number per completion, or one for the batch (repeated)."""
        if not isinstance(name, str) or not name or name in TAKEN:
            what = (
                f"returned a metric named {name!r} (reward/mean, reward/std and reward/accuracy are built in)"
            )
            raise self.error(what, completions, None)
        value = _plain(value)
        if isinstance(value, numbers.Real):
            if not math.isfinite(value):
                raise self.error(f"returned {name}={value} for the batch", completions, None)
            return [float(value)] * len(completions)
        return self.column(value, name, completions)


def _plain(value: Any) -> Any:
    """Python values from numpy arrays/scalars and tensors."""
    if hasattr(value, "tolist") and not isinstance(value, list | tuple):
        return value.tolist()
    return value
