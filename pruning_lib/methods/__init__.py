"""Pruning methods, one module each: the method only (no Store, no figures, no claims).

* :mod:`~pruning_lib.methods.bernoulli`: Bernoulli unit/filter gates learned to 0 or 1 (Guenter & Sideris 2022);
* :mod:`~pruning_lib.methods.criteria`: pruning criteria as scorers with one masking path, and their
  data-dependent variants (Lévai & Zombori 2020);
* :mod:`~pruning_lib.methods.gmp`: gradual magnitude pruning (Zhu & Gupta 2017, cubic schedule);
* :mod:`~pruning_lib.methods.hard_concrete`: L0-HC's hard-concrete gates (Louizos et al. 2018) and Dep-L0's
  gate generator (Li & Ji 2021), their penalties and compaction;
* :mod:`~pruning_lib.methods.imp`: iterative magnitude pruning with rewinding (Frankle & Carbin 2019);
* :mod:`~pruning_lib.methods.l1_filter`: L1-norm filter / unit pruning (Li et al. 2017);
* :mod:`~pruning_lib.methods.lnpt`: the learning gap, label-free pruning and training (Xiao et al. 2024);
* :mod:`~pruning_lib.methods.polarization`: per-input binary gates pulled to a consensus (Zhi et al. 2023);
* :mod:`~pruning_lib.methods.scratch`: Scratch-B, a pruned architecture trained from fresh weights with
  the same compute (Liu et al. 2019).
"""
