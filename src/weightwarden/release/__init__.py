"""RELEASE: the export-control gate (issue 7, first slice): classify a model against signed
rules.  Recipient screening and the release decision are not built yet."""

from .classify import Classification, Compute, classify, count_parameters, estimate_compute
from .rules import RulesError, RuleSet, default_rules, load_rules

__all__ = ["Classification", "Compute", "RuleSet", "RulesError", "classify", "count_parameters", "default_rules",
           "estimate_compute", "load_rules"]  # fmt: skip
