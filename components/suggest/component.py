from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def suggest(
    search_space: dict,
    finished: List[str],
    history_out: Output[Dataset],
    history_in: Input[Dataset] = None,
    batch_size: int = 2,
    seed: int = 0,
    round_index: int = 0,
    results_uri: str = "",
    config: dict = {},
) -> List[dict]:
    """The next batch of trial configurations (mango, batch mode) from every finished trial: the
    earlier rounds' history, the last round's results and, on the first round, the training CSV
    already at the results URI, so a scheduled run continues the search. A given `config` is
    returned as the only trial (a single run, no tuning)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO)
    return stages.suggest(search_space, history_in.path if history_in else "", finished, batch_size, seed,
                          history_out.path, results_uri, round_index, config)
