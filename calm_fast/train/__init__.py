"""Training of WSOL models: the loop (`loop`), optimiser, schedule and DeepSpeed config (`optim`), the stop on a
non-finite loss or gradient (`divergence`), the run record (`log`), checkpoints (`checkpoint`) and
`calm-fast train` (`cli`)."""
