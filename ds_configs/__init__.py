"""DeepSpeed JSON templates, found by name (``default``, ``zero2``, ``rtx3090``) from a run config's
``deepspeed.template``. Batch, clipping, precision and optimizer are filled in from the run config by
``pipeline.ds_config.derive_ds_config`` and must not appear here."""
