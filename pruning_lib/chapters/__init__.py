"""Chapter modules, one per notebook: Config, units, run, tables, figures and claims (issue 13's layer).

* :mod:`~pruning_lib.chapters.dense_baselines`: chapter 1, the dense reference networks;
* :mod:`~pruning_lib.chapters.lottery_tickets`: chapter 2, lottery tickets with data-dependent criteria;
* :mod:`~pruning_lib.chapters.dep_l0`: chapter 3, Dep-L0 against L0-HC;
* :mod:`~pruning_lib.chapters.bernoulli_gates`: chapter 4, Bernoulli gates that converge to a deterministic network;
* :mod:`~pruning_lib.chapters.polarization`: chapter 5, consensus sub-networks with polarization regularization;
* :mod:`~pruning_lib.chapters.lnpt`: chapter 6, LNPT, the learning gap and label-free pruning and training;
* :mod:`~pruning_lib.chapters.comparison`: chapter 7, every method on one model, one budget, one axis.
"""
