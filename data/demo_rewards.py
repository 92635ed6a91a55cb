"""An example of your own GRPO reward (configs/demo_grpo.yaml: data/demo_rewards.py:contains_answer).

A reward is a function TRL's GRPOTrainer calls with the batch's prompts, completions (text) and completion_ids, plus
each column of the training rows, one value per completion: here `answer`, the row's reference answer. It returns
one number per completion (None: no reward for that one). finetune.py loads this file with a warning that it runs
your code, and tries the function on one training row before the run starts.
"""

from ftkit.scoring import normalize_answer


def contains_answer(completions, answer, **kwargs):
    """Partial credit while the model still wraps the answer in a sentence: 1 when the reference answer appears in
    the completion (after evaluate.py's normalization), else 0. With exact_match beside it, GRPO first learns to
    find the answer and then to give it alone."""
    return [float(normalize_answer(a) in normalize_answer(c)) for c, a in zip(completions, answer)]
