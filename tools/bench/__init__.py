"""The checkpoint benchmark's modules; ``tools/bench_checkpoint.py`` is its command line and imports them as ``bench``.

* ``common``: the repository's path, the modes, ``BenchError``, and the statistics every part uses;
* ``system``: this machine while the benchmark runs (a rank's peak host memory, other processes' CPU use, the
  environment and a hash of ftrain's sources);
* ``launch``: torchrun jobs with their output logged;
* ``micro``: the micro part on one rank of a torchrun job (floors, ``dcp.save``, each mode, resume);
* ``trainer_runs``: the trainer part (``recipes/train.py`` runs, steps/s from TensorBoard);
* ``goodput``, ``object_storage``: the goodput and s3 parts;
* ``own_loop``: the loop part (the public ``ftrain.Checkpointer`` in a loop of its own, before and after), whose
  jobs run ``loop_worker.py``, a script that imports nothing of the benchmark (it runs on older ftrain trees too);
* ``targets``: the save, goodput and loop targets and whether a result meets them;
* ``report``: bench.json and bench.md.

Imports point one way: the command line imports these modules, and none of them imports it.
"""
