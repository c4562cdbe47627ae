"""The attribution benchmarks of the paper (CALM.md §4): cue localization, remove-and-classify and the
gradient baselines, as parts of the distributed evaluation job."""
