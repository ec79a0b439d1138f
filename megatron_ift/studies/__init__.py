"""Does IFT work? Small SFT-versus-IFT studies that run on a CPU (``docs/study.md``).

* :mod:`.frozen_lake`: the grid game, its demonstrators and trajectories as SFT conversations;
* :mod:`.tasks`: exact-match scoring of addition / reversal on the shipped data;
* :mod:`.generate`: greedy decoding from a ``megatron-ift train`` checkpoint;
* :mod:`.run_study`: the driver (``python -m megatron_ift.studies.run_study [--quick]``);
* :mod:`.report`: plots and the results table.
"""
