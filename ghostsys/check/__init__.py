"""The ``check`` wing: are the modes the same experiment? (imports ``run`` and ``nn``).

``checker`` runs every factorization of a target G_M through the real training code, ``reference``
is the independent plain-ops model it compares against, ``report`` holds tolerances and the report.
"""

from ghostsys.check.checker import CheckConfig, check

__all__ = ["CheckConfig", "check"]
