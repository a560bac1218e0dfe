"""PMA inside the engines and trainers people train with, each in its own module (imported on
its own, so that none needs the others' packages):

* ``deepspeed``: a ``"pma"`` section in the DeepSpeed config (also :mod:`pma_dist.deepspeed`).
* ``accelerate``: one line after ``accelerator.prepare`` (also :mod:`pma_dist.accelerate`).
* ``hf``, ``lightning``, ``olmo_core``: a callback of the transformers ``Trainer``, of
  Lightning's and of OLMo-core's.
* ``torchtitan``: a step hook on the ``OptimizersContainer`` and a checkpoint entry.
* ``megatron``: ``attach(model, optimizer, config)`` after Megatron-Core's
  ``get_megatron_optimizer``.

Import the module of the trainer in hand (``from pma_dist.integrations.hf import
PMACallback``); this face re-exports nothing, so that none of them loads with another.
"""

__all__: list[str] = []
