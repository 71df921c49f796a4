"""The values a setting can take, stated once: the config checks them, the command line offers
them (``--norm``, ``--schedule``, ``--mode``) and the attacks refuse others.

A plain module with no imports, so that ``robaudit --help`` can list them without loading torch.
"""

from __future__ import annotations

#: Threat models: the L-inf or the L2 ball around the input, in pixel units.
NORMS = ("linf", "l2")
#: PGD's step-size rules: Madry's fixed 2.5*eps/steps, or APGD's halving from 2*eps.
SCHEDULES = ("fixed", "halving")
#: How a scan's attacks share the examples: ``each`` attack on every clean-correct example, or
#: each later attack on the ``worst-case`` survivors of the earlier ones.
MODES = ("each", "worst-case")

#: Named portfolios for ``--attacks``.
PRESETS: dict[str, tuple[str, ...]] = {
    # PGD + T-PGD (then the finish); escalation adds its stages where the sanity checks see
    # masking.
    "fast": ("pgd", "tpgd"),
    # AutoAttack standard's portfolio, each attack on the previous ones' survivors.
    "standard": ("apgd-ce", "apgd-t", "square"),
}
#: The default finish: targeted DLR on the examples no attack broke (ScanConfig.finish).
FINISH = ("dlr-t",)
#: Escalation's attacks, in order (audit.py runs each by its traits): a scale-invariant loss on
#: the classes with signs of masking, then a gradient-free search where the signs persist.
ESCALATION = ("dlr", "square")
