"""The original toolkit's HPO command, kept: `python -m mexp.hpo_train --config configs/lstm_stage2.yaml`.

Same as `python -m mexp.hpo`; with a stage config and no `hpo` section it searches the
stage's default space (mexp/resources/hpo_spaces.yaml) for `hpo.trials` trials.
"""
from mexp import cli
from mexp.hpo import main

if __name__ == "__main__":
    cli.run(main, __doc__)
