"""Evaluation of WSOL maps: map sources (`maps`, `baselines`), scoring and the cross-rank sum
(`scoring`), the per-rank job (`job`), the report files (`reports`) and `calm-fast eval` (`cli`)."""
