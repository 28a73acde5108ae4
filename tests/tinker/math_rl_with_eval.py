"""Run tinker-cookbook's ``math_rl`` recipe, unmodified, from its own command line, with a held-out
evaluator on its arithmetic environment.

    python math_rl_with_eval.py KEY=VALUE ...   (math_rl's own arguments)

The arithmetic environment (the one that needs no download) has no test split, so the recipe
runs no eval on it; this adds one through the hook ``rl.train.Config`` offers
(``evaluator_builders``): the cookbook's own ``RLTestSetEvaluator`` on two held-out groups of its
own ``ArithmeticDataset``. Its metrics are ``test/*``, logged every ``eval_every`` iterations with
the sampling client of that iteration. Everything else is the recipe's ``cli_main``.
"""

from __future__ import annotations

import asyncio

import chz
from tinker_cookbook import renderers
from tinker_cookbook.recipes.math_rl import train as math_rl
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDataset
from tinker_cookbook.rl.metric_util import RLTestSetEvaluator
from tinker_cookbook.tokenizer_utils import get_tokenizer

recipe_main = math_rl.main


async def main_with_eval(config):  # type: ignore[no-untyped-def]
    renderer = renderers.get_renderer(config.renderer_name, tokenizer=get_tokenizer(config.model_name))
    held_out = ArithmeticDataset(batch_size=2, renderer=renderer, n_batches=1, include_fewshot=True, group_size=2)
    evaluator = RLTestSetEvaluator(held_out, max_tokens=config.max_tokens)
    return await recipe_main(chz.replace(config, evaluator_builders=[lambda: evaluator]))


if __name__ == "__main__":
    math_rl.main = main_with_eval  # what cli_main calls once it has built the recipe's Config
    asyncio.run(math_rl.cli_main(chz.entrypoint(math_rl.CLIConfig)))
