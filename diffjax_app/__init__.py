"""diffjax_app: the application layer of diffjax — experiment configs, runners, metrics, figures and the CLI.

Time convention: **t = 0 is noise, t = 1 is data**.

It sits beside the numerics (the ``diffjax`` package) and uses only their public API; nothing in ``diffjax``
imports it. This ``__init__`` imports nothing, so ``diffjax --help`` starts without loading JAX.

Modules: ``config`` (ExperimentConfig and the names of data sets, objectives and paths; pure Python),
``build`` (models, paths, objectives and data of a config), ``workdir`` (the files of a run, restoring it),
``train_runner``, ``sample_runner``, ``likelihood_runner`` (the three runs), ``metrics`` (sample quality with
power), ``plots`` (figures), ``cache`` (JAX's persistent compilation cache), ``errors``, ``cli``.
"""
