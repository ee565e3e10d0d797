"""budgetprune inside the trainers people already use: thin wrappers of :class:`budgetprune.Pruner`.

* :mod:`budgetprune.integrations.lightning` — ``BudgetPruning``, a PyTorch Lightning callback
  (``pip install 'budgetprune[lightning]'``);
* :mod:`budgetprune.integrations.huggingface` — ``BudgetPruningCallback``, a Hugging Face
  ``Trainer`` callback (``pip install 'budgetprune[huggingface]'``).

Both drive the pruner the same way (:class:`budgetprune.integrations.driver.TrainerDriver`):
a trainer's hooks cannot change the loss, so the penalty's gradient is added to the gradients
just before each optimizer step — the gradient of (loss + penalty), as in a plain loop.
"""
