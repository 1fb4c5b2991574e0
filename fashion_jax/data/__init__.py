"""Data: the data sets' facts (`datasets`: shape, classes, names), the IDX reader (`idx`), the
verified download (`download`), sources, splits and batches (`input_pipeline`) and augmentation
(`augment`). Stands alone: imports only `support.errors` and `support.paths`."""
