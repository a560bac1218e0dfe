"""The reference pre-training program with PMA: config, data, model, trainer, forecast, report."""
