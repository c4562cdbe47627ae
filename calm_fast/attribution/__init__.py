"""The attribution benchmarks of the CALM paper (CALM.md §4): do a method's maps point at the cue the model used?

Each module is one benchmark or one family of map sources, batched on the device and exact across ranks:
remove-and-classify (`remove_classify`), the gradient baselines (`gradients`) and their controls
(`controls`), with the model adapters they share (`model_fns`) and the keyed randomness that makes every
draw independent of batch size and rank count (`keyed_random`). The integer metric states they fill live
in `calm_fast.metrics`; the evaluation job (`calm_fast.evaluate`) runs them over a split.
"""
