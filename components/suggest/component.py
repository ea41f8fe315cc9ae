from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def suggest(
    search_space: dict,
    finished: List[str],
    trials_per_round: int,
    seed: int,
    round_index: int,
    results_uri: str,
    config: dict,
    clahe_clip: float,
    acquisition_copies: int,
    pretrain_task: str,
    pretrain_data: str,
    frozen_layers_count: str,
    threshold_policy: str,
    acquisition: str,
    selection: str,
    history_out: Output[Dataset],
    history_in: Input[Dataset] = None,
) -> List[dict]:
    """The next batch of trial configurations (mango, batch mode) from every finished trial: the
    earlier rounds' history, the last round's results and, on the first round, the training CSV
    already at the results URI (its rows recorded with this run's settings), so a scheduled run
    continues the search. A given `config` is the batch (a single run, no tuning: `trials_per_round` seeds of it)."""
    import logging

    from neumo import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    counts = {}
    configs = stages.suggest(search_space=search_space, history_in=history_in.path if history_in else "",
                             finished=finished, trials_per_round=trials_per_round, seed=seed,
                             history_out=history_out.path, results_uri=results_uri, round_index=round_index,
                             config=config, counts=counts, clahe_clip=clahe_clip,
                             acquisition_copies=acquisition_copies, pretrain_task=pretrain_task,
                             pretrain_data=pretrain_data, frozen_layers_count=frozen_layers_count,
                             threshold_policy=threshold_policy, acquisition=acquisition, selection=selection)
    history_out.metadata.update(counts)
    return configs
