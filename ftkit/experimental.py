"""What the project takes from trl.experimental, in one place: ORPO's trainer and CPO's (which runs SimPO's loss),
APIs TRL may change or remove without notice. Pinned to the TRL they were written against; the tripwire tests in
tests/test_patches.py (test_trl_experimental_*) fail when TRL moves or changes them.

  name                      from                       written against   tripwire
  ORPOConfig, ORPOTrainer   trl.experimental.orpo      trl 1.16.0        test_trl_experimental_orpo_and_cpo_still_fit
  CPOConfig, CPOTrainer     trl.experimental.cpo       trl 1.16.0        (the same; loss_type "simpo", simpo_gamma,
                                                                          cpo_alpha)
"""

from __future__ import annotations

PINNED_TRL = "1.16.0"
_FROM = {
    "ORPOConfig": "trl.experimental.orpo",
    "ORPOTrainer": "trl.experimental.orpo",
    "CPOConfig": "trl.experimental.cpo",
    "CPOTrainer": "trl.experimental.cpo",
}


def __getattr__(name: str):
    # Imported on first use: trl.experimental pulls in torch, and only train.method=orpo|simpo needs it.
    if name not in _FROM:
        raise AttributeError(name)
    import importlib
    import warnings

    import trl

    from .cli import log

    if trl.__version__ != PINNED_TRL:
        log.warning(
            "trl %s: %s comes from trl.experimental, pinned at trl %s; if training fails, install trl==%s "
            "(tests/test_patches.py says whether the API still fits)",
            trl.__version__,
            name,
            PINNED_TRL,
            PINNED_TRL,
        )
    with warnings.catch_warnings():
        # TRL's "you are importing from trl.experimental" warning: the pin above is this project's answer to it.
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        return getattr(importlib.import_module(_FROM[name]), name)
