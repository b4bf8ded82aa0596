"""Multi-modal sentiment analysis (CMU-MOSI format) for MELTR: ``data`` (loader, dataset, collate, a synthetic
file), ``metrics`` (MAE, correlation, binary / 7-class accuracies and F1), ``model`` (the one-loss regressor and
its training), ``run`` (its command line: ``python -m examples.meltr_sentiment.run --demo``), ``synthetic`` (a
latent-factor MOSI-format file), ``multitask`` (the model with auxiliary losses), ``finetune`` (single / MTL /
MELTR through ``bl.BilevelTrainer``), ``results`` (the paired comparison:
``python -m examples.meltr_sentiment.results --seeds 3 --write``)."""
