"""Hydra's sweep syntax as Optuna distributions: what ``hydra.sweeper.params`` and the command line of
``embtune -m hparams_search=optuna`` accept (``interval``, ``tag(log, interval)``, ``range``, ``choice``)."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer


def search_space(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Optuna distributions for the sweep overrides among ``overrides`` (``key=value`` strings, Hydra's
    override grammar), and the fixed ``key -> value`` of the others.

    - ``interval(a, b)``: ``FloatDistribution(a, b)`` (Hydra parses interval bounds as floats);
      ``tag(log, interval(a, b))``: the same with ``log=True`` (sampled uniformly in log a..log b).
    - ``range(start, stop[, step])``: the values Hydra's basic sweeper would run, ``stop`` excluded:
      ``IntDistribution(start, last, step)`` for ints, ``FloatDistribution(start, last, step=step)`` for
      floats; ``shuffle(range(...))``: ``CategoricalDistribution`` of those values.
    - ``choice(a, b, ...)`` or ``a,b,...``: ``CategoricalDistribution`` (lists and dicts as their override
      strings).

    Raises:
        ValueError: a tag other than ``log``, ``log`` on a choice or range, an empty range, or a sweep
            kind Optuna cannot sample (``glob``), naming the key and what was typed.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
            continue
        value = override.value()
        typed = override.input_line or key
        if value.tags - {"log"} or ("log" in value.tags and not isinstance(value, IntervalSweep)):
            raise ValueError(f"hydra.sweeper.params: {typed}: only tag(log, interval(a, b)) is supported "
                             f"(got tags {sorted(value.tags)} on a {type(value).__name__})")
        if isinstance(value, IntervalSweep):
            space[key] = FloatDistribution(value.start, value.end, log="log" in value.tags)
        elif isinstance(value, RangeSweep):
            values = list(value.range())  # in order (the sweep iterator shuffles a shuffle(range(...)))
            if not values:
                raise ValueError(f"hydra.sweeper.params: {typed}: the range holds no value")
            if value.shuffle:
                space[key] = CategoricalDistribution(values)
            elif all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
                space[key] = IntDistribution(values[0], values[-1], step=value.step)
            else:
                space[key] = FloatDistribution(values[0], values[-1], step=value.step)
        elif isinstance(value, ChoiceSweep):
            space[key] = CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        else:
            raise ValueError(f"hydra.sweeper.params: {typed}: Optuna samples interval, range and choice "
                             f"sweeps, not {type(value).__name__}")
    return space, fixed


def choice_strings(overrides: list[str]) -> dict[str, dict]:
    """For each choice sweep among ``overrides``: Optuna's choice value -> the value as an override string
    (``a b`` -> ``a\\ b``; a list, which Optuna holds as the string ``[1,2]``, stays ``[1,2]``)."""
    strings = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override() and isinstance(override.value(), ChoiceSweep):
            strings[override.get_key_element()] = dict(zip(
                override.sweep_iterator(transformer=Transformer.encode),
                override.sweep_iterator(transformer=Transformer.str)))
    return strings
