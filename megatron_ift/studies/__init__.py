"""Does IFT work? SFT-versus-IFT studies that run on a CPU (``docs/study.md``).

* :mod:`.run_study`: the driver (``python -m megatron_ift.studies.run_study [--quick | --pretrained]``);
* :mod:`.runs`: study configs (shipped in ``configs/`` or any file), points, one training run;
* from scratch: :mod:`.frozen_lake` (the grid game, demonstrators, trajectories as SFT
  conversations), :mod:`.tasks` (addition / reversal on the shipped data), :mod:`.generate`
  (greedy decoding of tiny models), :mod:`.scratch_tasks` (the tasks and their metadata),
  :mod:`.report` (plots and table);
* from a pretrained model: :mod:`.chat_tasks` (Frozen Lake plans and worked addition in plain
  words), :mod:`.chat_model` (KV-cache greedy answers in the model's chat template),
  :mod:`.pretrained` (import, base scores, equal-steps / equal-compute runs),
  :mod:`.pretrained_report` (plots and tables).
"""
