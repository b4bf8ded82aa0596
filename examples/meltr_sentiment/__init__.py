"""Multi-modal sentiment analysis (CMU-MOSI format) for MELTR: ``data`` (loader, dataset, collate, a synthetic
file), ``metrics`` (MAE, correlation, binary / 7-class accuracies and F1), ``model`` (the regressor and its
training), ``run`` (the command line: ``python -m examples.meltr_sentiment.run --demo``)."""
